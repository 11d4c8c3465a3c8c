"""Training loss against the simulated federation's clock: how a deadline, partial work and
over-selection trade rounds for time on heterogeneous devices.

    .venv/bin/python examples/devices_deadline.py [--rounds 150] [--out docs/]

Synthetic(0.5, 0.5), 300 clients, 30 counted per round, 5 local epochs, batch 10, client SGD
0.01; phone-class devices drawn by `fs.devices.Devices.sample` (log-normal compute and links:
the slowest clients of a cohort take several times the median). Four policies on the same
population and seed: wait for every client; a deadline at the median client's time with late
clients dropped (FedAvg's rule) or keeping the local steps that fit (FedProx's partial work);
and over-selection by 1.3 with no deadline (the first 30 of 39 to finish count). The curve is
the training loss on all the training data every 5 rounds, plotted against "virtual_time".
Writes `devices_deadline.png` and `.json` to `--out`.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import optax

import fedjax_sim as fs

NUM_CLIENTS, COHORT = 300, 30


def policies(profiles, median_time):
    return {"wait for all": fs.devices.DeviceModel(profiles),
            "deadline, late dropped": fs.devices.DeviceModel(profiles, deadline=median_time),
            "deadline, partial work kept": fs.devices.DeviceModel(
                profiles, deadline=median_time, keep_partial=True),
            "over-selection 1.3": fs.devices.DeviceModel(profiles, over_selection=1.3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, _ = fs.data.synthetic(0.5, 0.5, num_clients=NUM_CLIENTS, seed=0)
    algo = fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.01),
                                batch_size=10, num_epochs=5)
    profiles = fs.devices.Devices.sample(NUM_CLIENTS, seed=0)
    probe = fs.Simulation(algo, train, cohort_size=COHORT, seed=0, chunk_size=1,
                          progress=False, devices=fs.devices.DeviceModel(profiles))
    median_time = float(np.median(np.concatenate(
        [probe.plan(r).client_time for r in range(20)])))
    results, start = {"median_client_time_s": median_time}, time.perf_counter()
    for name, model in policies(profiles, median_time).items():
        result = fs.simulate(algo, train, rounds=args.rounds, cohort_size=COHORT, seed=0,
                             eval_data=train, eval_every=args.every, chunk_size=1,
                             progress=False, devices=model)
        h = result.history
        results[name] = {
            "curve": [(r["virtual_time"], r["round"] + 1, r["eval"]["loss"]["weighted_mean"])
                      for r in h if "eval" in r],
            "mean_round_time_s": h[-1]["virtual_time"] / len(h),
            "clients_counted_per_round": float(np.mean([r["num_included"] for r in h])),
            "late_per_round": float(np.mean([r["num_late"] for r in h]))}
        final = results[name]["curve"][-1]
        print(f"{name:>28}: {results[name]['mean_round_time_s']:6.1f} s a round, final loss "
              f"{final[2]:.3f} at {final[0] / 3600:.2f} h ({time.perf_counter() - start:.0f} s)",
              flush=True)
    (out / "devices_deadline.json").write_text(json.dumps(results, indent=1))
    plot(results, args.rounds, out / "devices_deadline.png")


def plot(results, rounds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        t, n, loss = zip(*r["curve"], strict=True)
        axes[0].plot(np.array(t) / 3600, loss, label=f"{name} ({r['mean_round_time_s']:.0f} "
                     "s/round)")
        axes[1].plot(n, loss, label=name)
    axes[0].set_xlabel("virtual time (hours of the simulated federation)")
    axes[1].set_xlabel("round")
    for ax in axes:
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Synthetic(0.5,0.5), {NUM_CLIENTS} clients, {COHORT} counted per round, "
                 f"E = 5, {rounds} rounds; deadline = the median client's time "
                 f"({results['median_client_time_s']:.0f} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
