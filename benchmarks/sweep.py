"""A sweep as one program against the same runs one after another (issue 20), in one process.

W2 (logistic regression 784-10, 64 examples a client, batch 16, 1 epoch) on 1,000 clients at
cohort 100: 8 seeds as one `fs.simulate_sweep` (the runs vmapped, split over the CPU's two
XLA devices along the run axis) against 8 `fs.simulate` calls one after another, each as a
user would make it (one device; and, the stronger baseline, each run's cohort split over
both devices with `fs.client_mesh()`). Every system at the same chunk size, the whole call
timed (construction, compile or compilation-cache load, rounds), and the rounds alone from
each result's timings. Throughput = run-rounds per wall second; the goal is the sweep at 2x
the one-device runs. Passes alternate (sequential, sweep, sequential on the mesh) so load from
other processes falls on all alike; the table takes each system's median pass.

  python benchmarks/sweep.py            # ~3 min on a 2-core CPU
  python benchmarks/sweep.py --quick    # smaller, for a smoke test

Writes `benchmarks/results/sweep-<machine>.json` and `.md`.
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

jax.config.update("jax_num_cpu_devices", 2)  # before JAX's backend starts

import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core import machine_name  # noqa: E402
from run_fedjax_sim import build_model  # noqa: E402
from workloads import WORKLOADS, client_data  # noqa: E402

import fedjax_sim as fs  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=4)
    args = parser.parse_args(argv)
    rounds, passes = (5, 1) if args.quick else (args.rounds, args.passes)
    w, num_clients, cohort, seeds = WORKLOADS["W2"], 1000, 100, 8
    x, y = client_data(w, num_clients)
    train = fs.data.from_arrays(np.repeat(np.arange(num_clients), w.examples_per_client),
                                {"x": x, "y": y})
    algo = fs.algorithms.fedavg(build_model(w), optax.sgd(w.client_lr), optax.sgd(w.server_lr),
                                batch_size=w.batch_size, num_epochs=w.epochs)
    common = dict(rounds=rounds, cohort_size=cohort, chunk_size=args.chunk_size, progress=False)
    mesh = fs.client_mesh()

    def one_after_another(**kw):
        results = [fs.simulate(algo, train, seed=s, **common, **kw) for s in range(seeds)]
        return [r.params for r in results], sum(r.timings["rounds_s"] for r in results)

    def sweep():
        res = fs.simulate_sweep(algo, train, seeds=seeds, **common)
        return res.params, res.timings["rounds_s"]

    systems = {"8 runs one after another (1 device)": one_after_another,
               "fs.simulate_sweep (runs over 2 devices)": sweep,
               "8 runs one after another (cohort over 2 devices)":
                   lambda: one_after_another(mesh=mesh)}
    load_before = os.getloadavg()
    times = {name: [] for name in systems}
    finals = {}
    for _ in range(passes):
        for name, fn in systems.items():
            start = time.perf_counter()
            params, rounds_s = fn()
            times[name].append((time.perf_counter() - start, rounds_s))
            finals[name] = params
    load_after = os.getloadavg()
    # The same runs: the sweep's final params are the sequential runs' (float tolerance).
    gap = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for p, q in zip(finals[list(systems)[0]], finals[list(systems)[1]], strict=True)
              for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True))
    work = seeds * rounds
    rows = []
    for name, t in times.items():
        total = statistics.median(x[0] for x in t)
        only = statistics.median(x[1] for x in t)
        rows.append({"system": name, "total_s": total, "rounds_s": only,
                     "run_rounds_per_s": work / total, "rounds_only_per_s": work / only})
    base = rows[0]
    for row in rows:
        row["x_throughput"] = row["run_rounds_per_s"] / base["run_rounds_per_s"]
        row["x_rounds_only"] = row["rounds_only_per_s"] / base["rounds_only_per_s"]
    human, slug = machine_name()
    meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": human,
            "cpus": os.cpu_count(), "devices": jax.device_count(), "workload": w.description,
            "clients": num_clients, "cohort": cohort, "seeds": seeds, "rounds": rounds,
            "chunk_size": args.chunk_size, "passes": passes,
            "load_average_before": load_before, "load_average_after": load_after,
            "max_param_gap_sweep_vs_sequential": gap, "jax": jax.__version__}
    out = Path(__file__).resolve().parent / "results" / f"sweep-{slug}"
    if args.quick:
        out = out.with_name(out.name + "-quick")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# A sweep as one program: {w.description}", "",
             f"{meta['date']}, {human} ({meta['cpus']} CPUs, {meta['devices']} XLA devices), "
             f"jax {meta['jax']}; load average {load_before[0]:.2f} before, "
             f"{load_after[0]:.2f} after. {seeds} seeds x {rounds} rounds at cohort {cohort} "
             f"of {num_clients} clients, K = {args.chunk_size}; median of {passes} "
             f"alternating passes. Total: the whole call (construction, compile or cache "
             f"load, rounds); rounds only: the results' timings. Sweep vs one-after-another "
             f"final params differ by at most {gap:.2g}.", "",
             "| system | total s | run-rounds/s | x | rounds only s | run-rounds/s | x |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['total_s']:.2f} | {r['run_rounds_per_s']:.1f} | "
                     f"{r['x_throughput']:.2f} | {r['rounds_s']:.2f} | "
                     f"{r['rounds_only_per_s']:.1f} | {r['x_rounds_only']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
