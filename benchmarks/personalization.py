"""Personalization's speed figures (issue 18), each measured side by side in one run.

1. Evaluating a large population in one vectorized pass: every test client of a synthetic
   population (logistic regression 60-10, FedProx's IID generator, --num-clients clients),
   `fs.evaluate` (one compiled engine pass over all of them) against a per-client loop
   (`model.metrics` jitted once per client size, one client at a time, the way a Python loop
   over clients evaluates), clients per second. The loop runs on the first --loop-clients
   clients only (its rate does not depend on how many).
2. FedRep's round against FedAvg's on W1 (MLP 784-200-10) at 1,000 clients, every client in
   every round, K = 8, rounds interleaved (one of each in turn), the median of --rounds;
   FedRep's head is the last layer (5 head steps of the 4 a W1 client takes: the body's one
   pass of gradients is the same work either way), FedPer's too.

  python benchmarks/personalization.py            # ~4 min on a 2-core CPU
  python benchmarks/personalization.py --quick    # smaller, for a smoke test

Writes `benchmarks/results/personalization-<machine>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core import machine_name  # noqa: E402
from privacy import every_client  # noqa: E402
from run_fedjax_sim import build, build_model, interleaved_rounds, no_caches  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

import fedjax_sim as fs  # noqa: E402


def evaluation_throughput(num_clients: int, loop_clients: int) -> dict:
    _, test = fs.data.synthetic(0.0, 0.0, iid=True, num_clients=num_clients,
                                num_examples=20, seed=0)
    model = fs.models.logistic_regression(60, 10)
    params = model.init(jax.random.key(0))
    evaluator = fs.evaluation.Evaluator(model, test)
    evaluator(params)  # compile
    t = time.perf_counter()
    ev = evaluator(params)
    vectorized = time.perf_counter() - t
    metrics = jax.jit(model.metrics)
    for i in range(min(3, loop_clients)):  # warm the per-size programs it will meet
        jax.block_until_ready(metrics(params, test.client(i)))
    t = time.perf_counter()
    loop = []
    for i in range(loop_clients):
        out = metrics(params, test.client(i))
        loop.append(float(np.mean(np.asarray(out["accuracy"]))))
    looped = time.perf_counter() - t
    np.testing.assert_allclose(loop, ev.clients["accuracy"][:loop_clients], rtol=1e-5)
    return {"clients": test.num_clients, "examples": int(test.total_examples),
            "vectorized_s": vectorized, "vectorized_clients_per_s": test.num_clients / vectorized,
            "loop_clients": loop_clients, "loop_s": looped,
            "loop_clients_per_s": loop_clients / looped,
            "speedup": (test.num_clients / vectorized) / (loop_clients / looped)}


def fedrep_round(cohort: int, rounds: int, chunk_size: int) -> list[dict]:
    w = WORKLOADS["W1"]
    _, train = build(w, cohort)
    model = build_model(w)
    opt, server = optax.sgd(w.client_lr), optax.sgd(w.server_lr)
    kw = dict(batch_size=w.batch_size, num_epochs=w.epochs)
    algos = {"fedavg": fs.algorithms.fedavg(model, opt, server, client_weighting="uniform",
                                            **kw),
             "fedrep": fs.algorithms.fedrep(model, opt, server, head="Dense_1", head_steps=2,
                                            client_weighting="uniform", **kw),
             "fedper": fs.algorithms.fedper(model, opt, server, head="Dense_1",
                                            client_weighting="uniform", **kw)}
    return interleaved_rounds(algos, train, every_client(cohort), chunk_size, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--num-clients", type=int, default=None)
    parser.add_argument("--loop-clients", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=8)
    args = parser.parse_args()
    no_caches()
    num_clients = args.num_clients or (5000 if args.quick else 100_000)
    evaluation = evaluation_throughput(num_clients, min(args.loop_clients, num_clients))
    print(json.dumps(evaluation), flush=True)
    rows = fedrep_round(200 if args.quick else 1000, args.rounds or (3 if args.quick else 15),
                        args.chunk_size)
    human, slug = machine_name()
    meta = {"machine": human, "date": dt.date.today().isoformat(), "jax": jax.__version__}
    out = Path(__file__).resolve().parent / "results" / (
        f"personalization-{slug}{'-quick' if args.quick else ''}")
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "evaluation": evaluation, "rounds": rows}, indent=1))
    e = evaluation
    lines = [f"# Personalization's speed ({human}, {meta['date']}, jax {jax.__version__})", "",
             f"Evaluating {e['clients']:,} clients ({e['examples']:,} examples, logistic "
             f"regression): one vectorized pass {e['vectorized_s']:.2f} s "
             f"({e['vectorized_clients_per_s']:,.0f} clients/s); a per-client loop "
             f"{e['loop_clients_per_s']:,.0f} clients/s (over {e['loop_clients']:,}): "
             f"{e['speedup']:.0f}x.", "",
             "W1 at 1,000 clients, K = 8, median of interleaved rounds:", "",
             "| system | s/round | ratio to fedavg |", "|---|---|---|"]
    lines += [f"| {r['system']} | {r['s_per_round']:.3f} | {r['ratio']:.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
