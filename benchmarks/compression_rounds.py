"""Compression's cost in a round (issue 19): FedAvg's plain mean against each `fs.compression`
member on W1 (MLP 784-200-10, 159,010 parameters) at 1,000 clients, every client in every
round, uniform weights, K = 8 on one device, rounds interleaved (one of each system in turn),
the median of --rounds; the goal for top-k with error feedback is 1.3x the mean's round.
Each row carries its upload per client (`Aggregator.upload_bits`) and the machine's load
average, since other tenants' load moves every figure.

  python benchmarks/compression_rounds.py            # ~6 min on a loaded 2-core CPU
  python benchmarks/compression_rounds.py --quick    # 200 clients, 3 rounds: a smoke test

Writes `benchmarks/results/compression-<machine>.json` and `.md`. (Not `compression.py`: run as a
script from benchmarks/, that name would shadow Python 3.14's `compression` package, which
jax's compilation cache imports.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import jax
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core import machine_name  # noqa: E402
from privacy import every_client  # noqa: E402
from run_fedjax_sim import build, build_model, interleaved_rounds, no_caches  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

import fedjax_sim as fs  # noqa: E402
from fedjax_sim import aggregators as agg  # noqa: E402
from fedjax_sim import compression as comp  # noqa: E402

NUM_PARAMS = 784 * 200 + 200 + 200 * 10 + 10


def chains() -> dict:
    members = {"mean": [], "quantize 8 bits": [comp.quantize(8)],
               "hadamard + quantize 8 bits": [comp.hadamard_rotation(), comp.quantize(8)],
               "drive (1 bit)": [comp.drive()],
               "top-k 1% + error feedback": [comp.top_k(0.01)],
               "top-k 1%, no feedback": [comp.top_k(0.01, error_feedback=False)],
               "top-k ~1% sampled threshold + error feedback": [comp.top_k(0.01, exact=False)],
               "top-k ~1% sampled threshold, no feedback": [
                   comp.top_k(0.01, exact=False, error_feedback=False)],
               "sign (majority vote)": [comp.sign_sgd()]}
    return {name: agg.chain(agg.weight_by("uniform"), *stages, agg.mean())
            for name, stages in members.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per system")
    args = parser.parse_args()
    no_caches()
    w = WORKLOADS["W1"]
    cohort = 200 if args.quick else 1000
    rounds = args.rounds or (3 if args.quick else 9)
    _, train = build(w, cohort)
    load_before = os.getloadavg()
    algorithms = {name: fs.algorithms.fedavg(build_model(w), optax.sgd(w.client_lr),
                                             optax.sgd(w.server_lr), batch_size=w.batch_size,
                                             num_epochs=w.epochs, aggregator=chain)
                  for name, chain in chains().items()}
    rows = interleaved_rounds(algorithms, train, every_client(cohort), args.chunk_size, rounds)
    for r in rows:
        r["uplink_bits"] = comp.upload_bits(algorithms[r["system"]].aggregator, NUM_PARAMS)
    human, slug = machine_name()
    out = Path(__file__).resolve().parent / "results" / (
        f"compression-{slug}{'-quick' if args.quick else ''}")
    meta = {"machine": human, "date": dt.date.today().isoformat(), "jax": jax.__version__,
            "workload": f"W1, {cohort} clients, all every round, K={args.chunk_size}",
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "cpus": os.cpu_count()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Compression against the plain mean: {meta['workload']}", "",
             f"{human}, {meta['date']}, jax {jax.__version__}; median of {rounds} interleaved "
             f"rounds; load average {load_before[0]:.1f} before, "
             f"{meta['load_average_after'][0]:.1f} after, on {meta['cpus']} CPUs.", "",
             "| system | s/round | ratio to mean | upload bits/client | x smaller | compile s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['s_per_round']:.3f} | {r['ratio']:.2f} | "
              f"{r['uplink_bits']:,} | {32 * NUM_PARAMS / r['uplink_bits']:.0f} | "
              f"{r['compile_s']:.1f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
