"""SCAFFOLD against FedAvg on a pathological label split (Karimireddy et al. 2020): two classes
per client, where local steps drift toward each client's own classes.

    .venv/bin/python examples/scaffold_label_skew.py [--rounds 200] [--out docs/]

Data: the FEMNIST-105 writers' digits and letters pooled, then dealt to 100 clients as
McMahan et al.'s shards, two per client (at most two classes each); the model is logistic
regression on the 784 pixels (convex, so the training loss compares the methods' optima
directly). Both methods: 10 clients per round, 5 local epochs of SGD at 0.05, batch 20, server
step 1, uniform client weights. The curve is the training loss over all clients every 5
rounds. Writes `scaffold_label_skew.png` and `.json` to `--out`.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import optax

import fedjax_sim as fs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    train, _ = fs.data.femnist()
    pooled = {"x": np.asarray(train.features["x"]).reshape(len(train.features["y"]), -1),
              "y": np.asarray(train.features["y"])}
    data = fs.data.partition.shards(pooled, 100, 2, seed=0)
    model = fs.models.logistic_regression(784, 62)
    common = dict(batch_size=20, num_epochs=5, client_weighting="uniform")
    methods = {"FedAvg": fs.algorithms.fedavg(model, optax.sgd(0.05), **common),
               "SCAFFOLD": fs.algorithms.scaffold(model, 0.05, **common)}
    results, start = {}, time.perf_counter()
    for name, algo in methods.items():
        result = fs.simulate(algo, data, rounds=args.rounds, cohort_size=10, seed=0,
                             eval_data=data, eval_every=args.every, chunk_size=2,
                             progress=False)
        results[name] = [(r["round"] + 1, r["eval"]["loss"]["weighted_mean"],
                          r["eval"]["accuracy"]["weighted_mean"]) for r in result.history
                         if "eval" in r]
        print(f"{name}: final training loss {results[name][-1][1]:.3f}, accuracy "
              f"{results[name][-1][2]:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaffold_label_skew.json").write_text(json.dumps(results))
    plot(results, out / "scaffold_label_skew.png")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results.items():
        rounds, loss, acc = zip(*rows, strict=True)
        loss_ax.plot(rounds, loss, label=name)
        acc_ax.plot(rounds, acc, label=name)
    loss_ax.set(xlabel="round", ylabel="training loss (all clients)", yscale="log")
    acc_ax.set(xlabel="round", ylabel="training accuracy (all clients)")
    loss_ax.legend()
    fig.suptitle("SCAFFOLD vs FedAvg, FEMNIST-105 pooled, 100 clients of 2 classes, "
                 "10 per round, 5 epochs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
