"""Rounds on the device (issue 20): 100 rounds of W2 (logistic regression 784-10, 64 examples a
client, batch 16, one epoch) at cohort 100 in one `lax.scan` (`Simulation(rounds_per_call=100)`)
against the same rounds run round by round, side by side in one process; the goal is 1.5x.

Three systems, each a `fs.Simulation` of FedAvg on the same population (1,000 clients by
default) at the same K (`--chunk-size`, default: the K `chunk_size=None` chooses, searched
once):
  * round by round, host sampler: `cohort_size=100`, today's default (`sim.run` packs round
    r + 1 on a background thread while round r runs);
  * round by round, on-device sampler: `sampler=fs.sampling.on_device(N, 100)`, the run the
    scan is equal to;
  * one scan: `cohort_size=100, rounds_per_call=100`.
Every program is compiled first (`sim.compile()`); then each repeat times `sim.run(100)` of
each system in turn (wall clock, records and history built, as a user gets them), so load
from other processes falls on all alike. Rows give the median over repeats and the ratio of
the host-sampler run to each; the machine's load average is recorded before and after.
A second cohort (`--small-cohort`, default 10) shows the same systems where the host's share
of a round is larger (0 to skip it).

  python benchmarks/scan_rounds.py             # ~2 min on a loaded 2-core CPU
  python benchmarks/scan_rounds.py --quick     # 20 rounds, 2 repeats: a smoke test

Writes `benchmarks/results/scan_rounds-<machine>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core import machine_name  # noqa: E402
from run_fedjax_sim import build, no_caches  # noqa: E402
from workloads import SEED, WORKLOADS  # noqa: E402

import fedjax_sim as fs  # noqa: E402


def mesh():
    return fs.client_mesh() if jax.device_count() > 1 else None


def systems(algo, train, cohort: int, rounds: int, chunk_size: int) -> dict:
    common = dict(seed=SEED, chunk_size=chunk_size, progress=False, mesh=mesh())
    return {
        "round by round, host sampler": fs.Simulation(algo, train, cohort_size=cohort,
                                                      **common),
        "round by round, on-device sampler": fs.Simulation(
            algo, train, sampler=fs.sampling.on_device(train.num_clients, cohort), **common),
        f"one scan of {rounds} rounds": fs.Simulation(algo, train, cohort_size=cohort,
                                                      rounds_per_call=rounds, **common),
    }


def measure(algo, train, cohort: int, rounds: int, chunk_size: int,
            repeats: int) -> tuple[list[dict], bool]:
    """Rows of the three systems at `cohort`, and whether the scan's final params equal its
    round-by-round twin's."""
    sims = systems(algo, train, cohort, rounds, chunk_size)
    compile_s = {name: sim.compile() for name, sim in sims.items()}
    times = {name: [] for name in sims}
    for _ in range(repeats):
        for name, sim in sims.items():
            t = time.perf_counter()
            result = sim.run(rounds)
            jax.block_until_ready(result.state)
            times[name].append(time.perf_counter() - t)
    _, on_device, scanned = (sim.state.params for sim in sims.values())
    same = all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in
               zip(jax.tree.leaves(on_device), jax.tree.leaves(scanned), strict=True))
    base = statistics.median(times["round by round, host sampler"])
    return [{"cohort": cohort, "chunk_size": chunk_size, "system": name,
             "s_per_run": statistics.median(ts),
             "ms_per_round": 1000 * statistics.median(ts) / rounds,
             "speedup": base / statistics.median(ts), "compile_s": compile_s[name],
             "runs_s": ts} for name, ts in times.items()], same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--population", type=int, default=1000)
    parser.add_argument("--cohort", type=int, default=100)
    parser.add_argument("--small-cohort", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=None, help="rounds per timed run")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--devices", type=int, default=1,
                        help="XLA host devices to split the cohort over (CPU only)")
    args = parser.parse_args()
    if args.devices > 1:
        jax.config.update("jax_num_cpu_devices", args.devices)  # before JAX's backend starts
    no_caches()
    rounds = args.rounds or (20 if args.quick else 100)
    repeats = args.repeats or (2 if args.quick else 5)
    w = WORKLOADS["W2"]
    algo, train = build(w, args.population)
    load_before = os.getloadavg()
    rows, same, chunk_sizes = [], True, {}
    for cohort in [args.cohort] + ([args.small_cohort] if args.small_cohort else []):
        k = args.chunk_size
        if k is None or k * jax.device_count() > cohort:
            k = fs.Simulation(algo, train, cohort_size=cohort, seed=SEED, progress=False,
                              mesh=mesh()).chunk_size
        chunk_sizes[cohort] = k
        cohort_rows, equal = measure(algo, train, cohort, rounds, k, repeats)
        rows += cohort_rows
        same = same and equal
    human, slug = machine_name()
    out = Path(__file__).resolve().parent / "results" / (
        f"scan_rounds-{slug}-{jax.device_count()}dev{'-quick' if args.quick else ''}")
    meta = {"machine": human, "date": dt.date.today().isoformat(), "jax": jax.__version__,
            "workload": f"W2, cohorts of {args.population} clients, {rounds} rounds a run, "
                        f"{jax.device_count()} device(s)", "chunk_size": chunk_sizes,
            "repeats": repeats, "scan_equals_round_by_round": bool(same),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "cpus": os.cpu_count()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Rounds on the device: {meta['workload']}", "",
             f"{human}, {meta['date']}, jax {jax.__version__}; median of {repeats} interleaved "
             f"runs of {rounds} rounds; load average {load_before[0]:.1f} before, "
             f"{meta['load_average_after'][0]:.1f} after, on {meta['cpus']} CPUs. The scan's "
             f"params equal its round-by-round twin's: {same}.", "",
             "| cohort | K | system | s per run | ms/round | speedup over host sampler | "
             "compile s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['cohort']} | {r['chunk_size']} | {r['system']} | {r['s_per_run']:.3f} | "
              f"{r['ms_per_round']:.2f} | {r['speedup']:.2f}x | {r['compile_s']:.1f} |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
