"""The accuracy-privacy trade-off of user-level DP on a population large enough for it.

Synthetic IID clients (FedProx's generator, 100,000 clients of 20 examples each), an MLP
60-200-10 (14,000 parameters: DP's noise grows with the square root of the parameter count),
cohorts of --cohort-size. For each epsilon in --epsilons (at delta = 1 / N^1.1, "inf" for no
noise) the noise multiplier is calibrated for --rounds rounds by dp-accounting's RDP
accountant (the runs' own ledgers report the epsilon spent), and each mechanism trains with
it:
  dp_fedavg         clip + Gaussian noise on the sum, Poisson sampling (McMahan et al. 2018)
  dp_fedavg_cyclic  the same noise, under cyclic participation (no amplification)
  dp_ftrl_*         correlated noise under cyclic participation (fs.dp_ftrl: tree
                    aggregation, banded Toeplitz, BLT), each client once every N / cohort
                    rounds
Test accuracy (example-weighted, over --eval-clients test clients) after the last round.

`--data femnist` runs the same table on FEMNIST-105 (105 real LEAF writers, an MLP
784-200-62): a population this small cannot give a useful user-level guarantee (delta =
1 / 105^1.1 = 0.006, and each round samples a fifth of it), and the table shows how far.

  python examples/privacy_tradeoff.py                    # ~1 h on a 2-core CPU
  python examples/privacy_tradeoff.py --data femnist     # ~15 min
  python examples/privacy_tradeoff.py --num-clients 2000 --cohort-size 50 --rounds 200 \
      --epsilons 0.25 --out /tmp/small     # many participations: DP-FTRL's regime, minutes

Writes `docs/privacy_tradeoff.{json,png}` (`docs/privacy_tradeoff_femnist.*` for FEMNIST).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import dp_accounting
import optax

import fedjax_sim as fs

A = fs.aggregators
DOCS = Path(__file__).resolve().parents[1] / "docs"


def mechanisms() -> list[str]:
    return ["dp_fedavg", "dp_fedavg_cyclic", "dp_ftrl_tree", "dp_ftrl_banded", "dp_ftrl_blt"]


def calibrate(event, epsilon: float, delta: float) -> float:
    """The smallest noise multiplier whose event stays within (epsilon, delta), by
    dp-accounting's RDP accountant (the one the runs' ledgers use)."""
    if math.isinf(epsilon):
        return 0.0
    return float(dp_accounting.calibrate_dp_mechanism(dp_accounting.rdp.RdpAccountant, event,
                                                      epsilon, delta))


def build(mechanism: str, epsilon: float, args, num_clients: int, delta: float, cache: dict):
    """(aggregator chain, sampler, noise multiplier) for one mechanism at one epsilon."""
    m, rounds = args.cohort_size, args.rounds
    clip = A.clip(args.clip), A.weight_by("uniform")
    if mechanism == "dp_fedavg":
        sampler = fs.sampling.poisson(num_clients, m)
    else:
        sampler = fs.sampling.cyclic(num_clients, m)
    p = sampler.participation
    if mechanism.startswith("dp_fedavg"):
        z = calibrate(lambda z: fs.privacy.gaussian_event(z, p, rounds), epsilon, delta)
        return A.chain(*clip, A.dp_mean(z, args.clip, m)), sampler, z
    kind = mechanism.removeprefix("dp_ftrl_")
    if kind not in cache:  # built once: the mechanism does not depend on the noise
        cache[kind] = fs.dp_ftrl.mechanism(kind, rounds, fs.dp_ftrl.separation(p))
    mech = cache[kind]
    z = calibrate(lambda z: mech.event(z, p, rounds), epsilon, delta)
    return A.chain(*clip, fs.dp_ftrl.dp_ftrl_mean(z, args.clip, m, mech)), sampler, z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["synthetic", "femnist"], default="synthetic")
    parser.add_argument("--path", default=None, help="FEMNIST's .npz (default: shared data)")
    parser.add_argument("--num-clients", type=int, default=100_000)
    parser.add_argument("--examples-per-client", type=int, default=20)
    parser.add_argument("--cohort-size", type=int, default=None,
                        help="default 200 (synthetic), 20 (femnist)")
    parser.add_argument("--model", choices=["mlp", "logistic"], default="mlp")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--server-momentum", type=float, default=0.9,
                        help="DP-FedAvgM: the server's SGD momentum")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--epsilons", default="inf,1,2,4,8")
    parser.add_argument("--mechanisms", default=",".join(mechanisms()))
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--client-lr", type=float, default=0.1)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--eval-clients", type=int, default=2000)
    parser.add_argument("--out", default=None,
                        help="default docs/privacy_tradeoff (docs/privacy_tradeoff_femnist)")
    args = parser.parse_args()
    femnist = args.data == "femnist"
    args.cohort_size = args.cohort_size or (20 if femnist else 200)
    args.out = args.out or str(DOCS / ("privacy_tradeoff_femnist" if femnist
                                       else "privacy_tradeoff"))
    if femnist:
        flat = lambda f: {**f, "x": f["x"].reshape(len(f["x"]), -1)}
        train, test = (d.map(flat) for d in fs.data.femnist(args.path))
        num_features, num_classes = 784, 62
    else:
        train, test = fs.data.synthetic(0.0, 0.0, iid=True, num_clients=args.num_clients,
                                        num_examples=args.examples_per_client, seed=0)
        num_features, num_classes = 60, 10
    delta = fs.privacy.default_delta(train.num_clients)
    print(f"{train}\ndelta = 1 / N^1.1 = {delta:.3g}")
    rows, cache = [], {}
    for mechanism in args.mechanisms.split(","):
        for text in args.epsilons.split(","):
            epsilon = float(text)
            if math.isinf(epsilon) and rows and rows[0]["target_epsilon"] == epsilon:
                continue  # without noise every mechanism is the same clipped FedAvg: run once
            chain, sampler, z = build(mechanism, epsilon, args, train.num_clients, delta,
                                      cache)
            model = (fs.models.mlp(num_features, num_classes, hidden=(200,))
                     if args.model == "mlp"
                     else fs.models.logistic_regression(num_features, num_classes))
            algo = fs.algorithms.fedavg(model, optax.sgd(args.client_lr),
                                        optax.sgd(args.server_lr,
                                                  momentum=args.server_momentum or None),
                                        batch_size=10, num_epochs=args.epochs,
                                        aggregator=chain)
            t = time.perf_counter()
            result = fs.simulate(algo, train, rounds=args.rounds, sampler=sampler,
                                 eval_data=test,
                                 eval_clients=min(args.eval_clients, test.num_clients),
                                 delta=delta, progress=False)
            acc = result.history[-1]["eval"]["accuracy"]["weighted_mean"]
            row = {"mechanism": mechanism, "target_epsilon": epsilon, "noise_multiplier": z,
                   "epsilon": result.privacy["epsilon"], "accuracy": acc,
                   "rounds": result.privacy["rounds"], "seconds": time.perf_counter() - t}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    meta = {"data": args.data, "num_clients": train.num_clients, "cohort_size": args.cohort_size,
            "rounds": args.rounds, "delta": delta, "clip": args.clip, "model": args.model,
            "epochs": args.epochs, "client_lr": args.client_lr, "server_lr": args.server_lr,
            "server_momentum": args.server_momentum}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, meta, out.with_suffix(".png"))


def plot(rows, meta, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    finite = sorted({r["target_epsilon"] for r in rows if math.isfinite(r["target_epsilon"])})
    ticks = finite + [2 * finite[-1]] if finite else [1.0]
    for mechanism in dict.fromkeys(r["mechanism"] for r in rows):
        mine = sorted((r for r in rows if r["mechanism"] == mechanism
                       and math.isfinite(r["target_epsilon"])), key=lambda r: r["target_epsilon"])
        ax.plot([r["target_epsilon"] for r in mine], [r["accuracy"] for r in mine], "o-",
                label=mechanism)
    for r in rows:  # one run without noise: every mechanism is then clipped FedAvg
        if math.isinf(r["target_epsilon"]):
            ax.plot([ticks[-1]], [r["accuracy"]], "k*", markersize=10, label="no noise")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t:g}" for t in finite] + ["inf"])
    ax.set_xlabel(f"user-level epsilon (delta = {meta['delta']:.1e})")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{meta.get('data', 'synthetic')}: {meta['num_clients']:,} clients, "
                 f"cohort {meta['cohort_size']}, {meta['rounds']} rounds", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
