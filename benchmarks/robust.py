"""Seconds per round of the robust aggregation rules against the mean, side by side (issue 19's
speed goals: coordinate median at most 3x a mean round, Krum at most 5x).

W1 (MLP 784-200-10, 64 examples a client, batch 16, one epoch) at 1,000 clients, every client
in every round, one chunk size K for all, uniform weights; each system one `fs.Simulation`
through the public API:
  mean               the streamed weighted mean (the baseline)
  median             coordinate-wise median (fs.robust.median)
  trimmed_mean       beta = 0.1 (fs.robust.trimmed_mean)
  krum, multi_krum   f = 10 (multi-Krum: m = 100); pairwise distances as one Gram matmul
  geometric_median   RFA, 3 smoothed Weiszfeld iterations
  norm_bound         each update clipped to norm 1, then the mean
  centered_clipping  tau = 1, one iteration
The rows reductions stack every update as [1000, 159010] float32 (636 MB). Compiled first,
then a warm-up round of each, then the timed rounds interleaved (one round of each system in
turn); `s/round` is the median, `ratio` the system's over the mean's.

  python benchmarks/robust.py --rounds 3   # ~15 min on a loaded 2-core CPU
  python benchmarks/robust.py --quick      # 200 clients, 3 timed rounds

Writes `benchmarks/results/robust-<machine>.json` and `.md`.
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

A, R = fs.aggregators, fs.robust


def chains(cohort: int) -> dict:
    """Each system's aggregation chain, uniform weights; the mean first (the baseline)."""
    f = cohort // 100
    rules = {"mean": A.mean(), "median": R.median(), "trimmed_mean": R.trimmed_mean(0.1),
             "krum": R.krum(f), "multi_krum": R.multi_krum(f, cohort // 10),
             "geometric_median": R.geometric_median(iters=3),
             "centered_clipping": R.centered_clipping(1.0)}
    out = {name: A.chain(A.weight_by("uniform"), rule) for name, rule in rules.items()}
    out["norm_bound"] = A.chain(R.norm_bound(1.0), A.weight_by("uniform"), A.mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per system")
    parser.add_argument("--only", nargs="*", default=None,
                        help="time these systems (beside the mean) only")
    args = parser.parse_args()
    no_caches()
    w = WORKLOADS["W1"]
    cohort = 200 if args.quick else 1000
    rounds = args.rounds or (3 if args.quick else 7)
    _, train = build(w, cohort)
    systems = {name: chain for name, chain in chains(cohort).items()
               if args.only is None or name == "mean" or name in args.only}
    algorithms = {name: fs.algorithms.fedavg(build_model(w), optax.sgd(w.client_lr),
                                             optax.sgd(w.server_lr), batch_size=w.batch_size,
                                             num_epochs=w.epochs, aggregator=chain)
                  for name, chain in systems.items()}
    load = os.getloadavg()
    rows = interleaved_rounds(algorithms, train, every_client(cohort), args.chunk_size, rounds)
    human, slug = machine_name()
    out = Path(__file__).resolve().parent / "results" / (
        f"robust-{slug}{'-quick' if args.quick else ''}")
    meta = {"machine": human, "date": dt.date.today().isoformat(), "jax": jax.__version__,
            "workload": f"W1, {cohort} clients, all every round, K={args.chunk_size}, "
                        f"{jax.device_count()} device(s)",
            "load_average_before": load, "load_average_after": os.getloadavg()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Robust aggregation against the mean: {meta['workload']}", "",
             f"{human}, {meta['date']}, jax {jax.__version__}; median of {rounds} interleaved "
             f"rounds; load average {load[0]:.1f} before, {meta['load_average_after'][0]:.1f} "
             "after (2 cores shared with other work).", "",
             "| system | s/round | ratio to mean | compile s |", "|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['s_per_round']:.3f} | {r['ratio']:.2f} | "
              f"{r['compile_s']:.1f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
