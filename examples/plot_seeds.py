"""Seeds as mean and band: a small sweep of run directories, then `fedjax-sim plot` on it.

    .venv/bin/python examples/plot_seeds.py [--rounds 40] [--seeds 3] [--runs runs/plot_seeds]
        [--out docs/]

FedAvg on Synthetic(1,1) (300 clients, cohort 30, batch 10, one epoch), client SGD at two
learning rates, three seeds each, on phone-class devices (`fs.devices.Devices.sample`, no
deadline: the clock waits for the slowest client). Every 4 rounds all 300 test splits are
evaluated with the global model and after 20 fine-tuning steps on each client's own
training split. Each run writes its directory (history.jsonl, clients.jsonl) under `--runs`,
with the `sweep.json` that names them; `fs.plots.plot_runs` then groups the runs that differ
only in seed and draws the curves and per-client distributions (png and svg) into
`--runs/plots`, and copies the curves and the per-client quantile bands to `--out` as
`plots_seeds_curves.png` and `plots_seeds_clients.png`.
"""

import argparse
import json
import shutil
from pathlib import Path

import optax

import fedjax_sim as fs

NUM_CLIENTS, COHORT = 300, 30
LEARNING_RATES = (0.01, 0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--runs", default="runs/plot_seeds")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    runs = Path(args.runs)
    train, test = fs.data.synthetic(1.0, 1.0, num_clients=NUM_CLIENTS, seed=0)
    model = fs.models.logistic_regression(60, 10)
    profiles = fs.devices.Devices.sample(NUM_CLIENTS, seed=0)
    entries = []
    for lr in LEARNING_RATES:
        algo = fs.algorithms.fedavg(model, optax.sgd(lr), batch_size=10)
        for seed in range(args.seeds):
            name = f"client_lr={lr},seed={seed}"
            out = runs / name
            shutil.rmtree(out, ignore_errors=True)
            result = fs.simulate(
                algo, train, rounds=args.rounds, cohort_size=COHORT, seed=seed,
                eval_data=test, eval_every=4,
                fine_tune=fs.evaluation.FineTune(optax.sgd(0.05), 20),
                devices=fs.devices.DeviceModel(profiles), output_dir=out, progress=False)
            final = result.history[-1]
            print(f"{name}: train loss {final['train_loss']:.3f}, accuracy "
                  f"{final['eval']['accuracy']['weighted_mean']:.3f}, after "
                  f"{final['virtual_time']:.0f} virtual s")
            entries.append({"name": name, "values": {"client_lr": lr, "seed": seed}})
    (runs / "sweep.json").write_text(json.dumps(
        {"grid": {"client_lr": list(LEARNING_RATES)}, "seeds": list(range(args.seeds)),
         "runs": entries}, indent=2))
    written = fs.plots.plot_runs([runs], runs / "plots", formats=("png", "svg"))
    print("\n".join(map(str, written)))
    docs = Path(args.out)
    docs.mkdir(parents=True, exist_ok=True)
    shutil.copy(runs / "plots" / "curves.png", docs / "plots_seeds_curves.png")
    shutil.copy(runs / "plots" / "clients_accuracy.png", docs / "plots_seeds_clients.png")


if __name__ == "__main__":
    main()
