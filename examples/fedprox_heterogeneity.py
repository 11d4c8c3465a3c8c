"""FedProx's Figures 1-2 (Li et al. 2020): FedAvg degrades with statistical heterogeneity and
with stragglers, FedProx (mu = 1, stragglers' partial work kept) stays stable.

    .venv/bin/python examples/fedprox_heterogeneity.py [--rounds 200] [--out docs/]

The paper's setup: Synthetic IID, (0,0), (0.5,0.5) and (1,1) with 30 clients, 10 per round,
E = 20 local epochs, client SGD 0.01, batch 10; 0%, 50% and 90% stragglers, each running a
uniform number of epochs in [1, E]. Three methods: FedAvg (mu = 0, stragglers dropped),
FedProx with mu = 0 (stragglers kept) and FedProx with mu = 1. The curve is the training loss
on all the training data (the example-weighted mean over clients), every 5 rounds. Writes
`fedprox_heterogeneity.png` and `.json` to `--out`.
"""

import argparse
import json
import time
from pathlib import Path

import optax

import fedjax_sim as fs

DATASETS = {"IID": dict(iid=True), "(0,0)": dict(alpha=0.0, beta=0.0),
            "(0.5,0.5)": dict(alpha=0.5, beta=0.5), "(1,1)": dict(alpha=1.0, beta=1.0)}
METHODS = {"FedAvg": dict(mu=0.0, drop_stragglers=True),
           "FedProx, mu = 0": dict(mu=0.0, drop_stragglers=False),
           "FedProx, mu = 1": dict(mu=1.0, drop_stragglers=False)}
STRAGGLERS = (0.0, 0.5, 0.9)


def curve(train, method, stragglers, rounds, every):
    model = fs.models.logistic_regression(60, 10)
    algo = fs.algorithms.fedprox(model, optax.sgd(0.01), batch_size=10, num_epochs=20,
                                 straggler_fraction=stragglers, **METHODS[method])
    result = fs.simulate(algo, train, rounds=rounds, cohort_size=10, seed=0, eval_data=train,
                         eval_every=every, chunk_size=1, progress=False)
    return [(r["round"] + 1, r["eval"]["loss"]["weighted_mean"]) for r in result.history
            if "eval" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, start = {}, time.perf_counter()
    for name, kwargs in DATASETS.items():
        train, _ = fs.data.synthetic(num_clients=30, seed=0, **kwargs)
        for p in STRAGGLERS:
            for method in METHODS:
                results[f"{name}|{p}|{method}"] = curve(train, method, p, args.rounds,
                                                        args.every)
                final = results[f"{name}|{p}|{method}"][-1][1]
                print(f"{name:>9} stragglers {p:.0%} {method:>16}: final loss {final:.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    (out / "fedprox_heterogeneity.json").write_text(json.dumps(results))
    plot(results, out / "fedprox_heterogeneity.png")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(STRAGGLERS), len(DATASETS), figsize=(14, 9), sharex=True)
    colors = {"FedAvg": "tab:blue", "FedProx, mu = 0": "tab:orange",
              "FedProx, mu = 1": "tab:green"}
    for i, p in enumerate(STRAGGLERS):
        for j, name in enumerate(DATASETS):
            ax = axes[i][j]
            for method in METHODS:
                xs, ys = zip(*results[f"{name}|{p}|{method}"], strict=True)
                ax.plot(xs, ys, label=method, color=colors[method])
            ax.set_title(f"Synthetic {name}, {p:.0%} stragglers", fontsize=10)
            ax.set_yscale("log")
            if i == len(STRAGGLERS) - 1:
                ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel("training loss")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("FedProx (Li et al. 2020, Figs. 1-2) reproduced with fedjax_sim: 30 clients, "
                 "10 per round, E = 20, SGD 0.01, batch 10")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
