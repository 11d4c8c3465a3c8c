"""Synchronous FedAvg against asynchronous FedBuff in virtual time, on the same device model.

Synthetic(alpha, beta) (FedProx's generator), logistic regression, clients whose per-example
compute time is log-normal (`fs.asynchronous.lognormal_devices`, sigma --spread): FedAvg
trains cohorts of M clients and each round lasts as long as its slowest client
(`fs.asynchronous.fedavg_round_times`); FedBuff keeps M clients in flight and aggregates every
K arrivals, with the paper's 1/sqrt(1 + staleness) weight and with a constant one. FedBuff
runs as many aggregations as fit in FedAvg's virtual time (planned first: the schedule needs
no training). Test accuracy (example-weighted, every test client) against virtual seconds.

    .venv/bin/python examples/fedbuff_vs_fedavg.py [--rounds 40] [--concurrency 50]

Writes docs/fedbuff_vs_fedavg.json and .png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
import optax

import fedjax_sim as fs

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-clients", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--buffer-size", type=int, default=10)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--client-lr", type=float, default=0.05)
    parser.add_argument("--evaluations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DOCS / "fedbuff_vs_fedavg"))
    args = parser.parse_args()
    train, test = fs.data.synthetic(0.5, 0.5, num_clients=args.num_clients, seed=args.seed)
    model = fs.models.logistic_regression(60, 10)
    opt, kw = optax.sgd(args.client_lr), dict(batch_size=10, max_examples_per_client=200)
    devices = fs.asynchronous.lognormal_devices(train.num_clients, seed=args.seed,
                                                sigma=args.spread)
    m, k = args.concurrency, args.buffer_size
    runs = {}

    fedavg = fs.algorithms.fedavg(model, opt, **kw)
    t = time.perf_counter()
    every = max(1, args.rounds // args.evaluations)
    result = fs.simulate(fedavg, train, rounds=args.rounds, cohort_size=m, seed=args.seed,
                         eval_data=test, eval_every=every, chunk_size=1, progress=False)
    clock = np.cumsum(fs.asynchronous.fedavg_round_times(fedavg, train, devices,
                                                         cohort_size=m, rounds=args.rounds,
                                                         seed=args.seed))
    runs["fedavg"] = {
        "updates": args.rounds, "wall_s": time.perf_counter() - t,
        "virtual_time": [float(clock[h["round"]]) for h in result.history if "eval" in h],
        "accuracy": [h["eval"]["accuracy"]["weighted_mean"] for h in result.history
                     if "eval" in h]}
    horizon = float(clock[-1])

    # How many aggregations fit in FedAvg's virtual time: the schedule alone, no training.
    params = model.init(jax.random.key(args.seed))
    durations = fs.asynchronous.client_durations(devices, fedavg.batching, train, params)
    guess = fs.asynchronous.plan(train.num_clients, durations, concurrency=m, buffer_size=k,
                                 num_aggregations=args.rounds * m, seed=args.seed)
    n = max(1, sum(a.time <= horizon for a in guess.aggregations))
    for staleness in ("sqrt", "constant"):
        algo = fs.algorithms.fedbuff(model, opt, buffer_size=k, staleness=staleness, **kw)
        t = time.perf_counter()
        res = fs.asynchronous.simulate_async(algo, train, devices, concurrency=m,
                                             num_aggregations=n, seed=args.seed,
                                             eval_data=test,
                                             eval_every=max(1, n // args.evaluations))
        evals = [h for h in res.history if "eval" in h]
        runs[f"fedbuff ({staleness})"] = {
            "updates": n, "wall_s": time.perf_counter() - t,
            "virtual_time": [h["virtual_time"] for h in evals],
            "accuracy": [h["eval"]["accuracy"]["weighted_mean"] for h in evals],
            "staleness_mean": float(np.mean([h["staleness_mean"] for h in res.history])),
            "staleness_max": max(h["staleness_max"] for h in res.history),
            "version_slots": res.plan.num_slots}
    for name, r in runs.items():
        print(f"{name}: {r['updates']} server updates in {r['virtual_time'][-1]:.1f} virtual s "
              f"({r['wall_s']:.1f} wall s), final accuracy {r['accuracy'][-1]:.3f}", flush=True)

    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "runs": runs},
                                                   indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in runs.items():
        ax.plot(r["virtual_time"], r["accuracy"], marker=".", label=name)
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("test accuracy (example-weighted)")
    ax.set_title(f"Synthetic(0.5, 0.5), {m} clients in flight, log-normal speeds "
                 f"(sigma {args.spread:g}); FedBuff K = {k}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out}.json and .png")


if __name__ == "__main__":
    main()
