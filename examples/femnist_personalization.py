"""Per-writer accuracy on FEMNIST-105 of the global FedAvg model, the same model fine-tuned on
each writer's own training split, Ditto's personal models and FedRep's personal heads, as
distributions over the 105 writers (median, 10th percentile, worst decile), with a CDF plot.

    .venv/bin/python examples/femnist_personalization.py [--rounds 100] [--model mlp|cnn]

Defaults: an MLP 784-200-62 (the EMNIST CNN with `--model cnn`, some 10x slower on a CPU),
20 writers a round, one local epoch of batches of 20, client SGD 0.05, server SGD 1.0;
fine-tuning takes --fine-tune-steps steps of the client optimizer; Ditto's lambda
--lam; FedRep's head is the last layer, trained --head-steps steps before the body.
Writes docs/femnist_personalization.json and .png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import optax

import fedjax_sim as fs

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=None)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--cohort", type=int, default=20)
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--client-lr", type=float, default=0.05)
    parser.add_argument("--fine-tune-steps", type=int, default=20)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--head-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DOCS / "femnist_personalization"))
    args = parser.parse_args()
    train, test = fs.data.femnist(args.path)
    if args.model == "mlp":
        flat = lambda f: {**f, "x": f["x"].reshape(len(f["x"]), -1)}
        train, test = train.map(flat), test.map(flat)
        model, head = fs.models.mlp(784, 62, hidden=(200,)), "Dense_1"
    else:
        model, head = fs.models.emnist_cnn(), "Dense_1"
    opt = optax.sgd(args.client_lr)
    kw = dict(batch_size=20, num_epochs=1)
    algos = {"fedavg": fs.algorithms.fedavg(model, opt, **kw),
             "ditto": fs.algorithms.ditto(model, opt, lam=args.lam, **kw),
             "fedrep": fs.algorithms.fedrep(model, opt, head=head, head_steps=args.head_steps,
                                            **kw)}
    tune = fs.evaluation.FineTune(opt, args.fine_tune_steps, batch_size=20)
    runs, rows = {}, {}
    for name, algo in algos.items():
        t = time.perf_counter()
        result = fs.simulate(algo, train, rounds=args.rounds, cohort_size=args.cohort,
                             seed=args.seed, eval_data=test, progress=False,
                             fine_tune=tune if name == "fedavg" else None)
        last = result.history[-1]
        print(f"{name}: {args.rounds} rounds in {time.perf_counter() - t:.0f} s")
        if name == "fedavg":
            runs["FedAvg (global)"] = last["eval_clients"]["accuracy"]
            runs[f"FedAvg fine-tuned ({args.fine_tune_steps} steps)"] = \
                last["eval_personal_clients"]["accuracy"]
        else:
            runs[{"ditto": f"Ditto (lambda {args.lam:g})",
                  "fedrep": "FedRep"}[name]] = last["eval_personal_clients"]["accuracy"]
            runs[f"{name} global model"] = last["eval_clients"]["accuracy"]
    print(f"\nper-writer test accuracy over {test.num_clients} writers:")
    print(f"{'':36s} {'mean':>6s} {'p50':>6s} {'p10':>6s} {'worst10':>8s}")
    for label, acc in runs.items():
        acc = np.asarray(acc, np.float64)
        worst = np.sort(acc)[: max(1, len(acc) // 10)].mean()
        rows[label] = {"mean": acc.mean(), "p50": np.percentile(acc, 50),
                       "p10": np.percentile(acc, 10), "worst10": worst}
        print(f"{label:36s} {acc.mean():6.3f} {np.percentile(acc, 50):6.3f} "
              f"{np.percentile(acc, 10):6.3f} {worst:8.3f}")
    meta = {k: v for k, v in vars(args).items() if k not in ("path", "out")}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "summary": rows, "per_writer": {k: list(v) for k, v in runs.items()}},
        indent=1))
    plot(runs, meta, out.with_suffix(".png"))


def plot(runs: dict, meta: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, acc in runs.items():
        if "global model" in label:
            continue  # Ditto's and FedRep's global models: in the JSON, not the picture
        acc = np.sort(np.asarray(acc))
        ax.step(acc, np.arange(1, len(acc) + 1) / len(acc), where="post", label=label)
    ax.set_xlabel("test accuracy of a writer")
    ax.set_ylabel("fraction of writers at or below")
    ax.set_title(f"FEMNIST-105, {meta['model']}, {meta['rounds']} rounds of "
                 f"{meta['cohort']} writers", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
