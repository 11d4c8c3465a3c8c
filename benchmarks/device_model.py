"""The device model's cost (issue 19, part 1), measured side by side in one run.

1. The host's plan of a round (`Simulation.plan`: the draw among the available clients,
   each client's planned steps, its time, dropouts, the deadline, over-selection), alone,
   for populations of 1,000 and 100,000 clients (cohort 1%, over-selection 1.3, diurnal
   availability, 10% dropout, a deadline with partial work): milliseconds a round. It runs
   on the prefetch thread with the packing, off the round's critical path.
2. W1's round (MLP 784-200-10) at --cohort clients, every client every round, K = 8, rounds
   interleaved (one of each in turn), the median of --rounds: FedAvg without a device
   model; with one whose deadline nobody misses (the same work, plus the plan); and with a
   deadline at the median client's time and partial work (fewer local steps: the budget is
   a step cap, in the same compiled program).

  python benchmarks/device_model.py            # ~2 min on a 2-core CPU
  python benchmarks/device_model.py --quick    # smaller, for a smoke test

Writes `benchmarks/results/device_model-<machine>.json` and `.md`.
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
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core import machine_name  # noqa: E402
from privacy import every_client  # noqa: E402
from run_fedjax_sim import SimulationRounds, build, no_caches  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

import fedjax_sim as fs  # noqa: E402


def plan_cost(num_clients: int, repeats: int) -> dict:
    """Milliseconds of one round's plan (median of `repeats` fresh rounds)."""
    train, _ = fs.data.synthetic(0.0, 0.0, iid=True, num_clients=num_clients,
                                 num_examples=20, seed=0)
    algo = fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.1),
                                batch_size=10)
    profiles = fs.devices.Devices.sample(num_clients, 0)
    model = fs.devices.DeviceModel(profiles, deadline=1.0, keep_partial=True, dropout=0.1,
                                   over_selection=1.3,
                                   availability=fs.devices.diurnal(num_clients, 0, period=600))
    sim = fs.Simulation(algo, train, cohort_size=max(1, num_clients // 100), chunk_size=1,
                        progress=False, devices=model)
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        sim.plan(r)
        times.append(time.perf_counter() - t)
    return {"clients": num_clients, "cohort": max(1, num_clients // 100),
            "plan_ms": 1000 * statistics.median(times)}


def rounds_with_devices(cohort: int, rounds: int, chunk_size: int) -> list[dict]:
    w = WORKLOADS["W1"]
    algo, train = build(w, cohort)
    sampler = every_client(cohort)
    profiles = fs.devices.Devices.sample(cohort, 0)
    probe = fs.devices.DeviceModel(profiles)
    sim = fs.Simulation(algo, train, sampler=sampler, chunk_size=chunk_size, progress=False,
                        devices=probe)
    median_time = float(np.median(sim.plan(0).client_time))
    models = {"no device model": None,
              "deadline none misses": fs.devices.DeviceModel(profiles, deadline=1e9),
              "deadline at the median, partial work": fs.devices.DeviceModel(
                  profiles, deadline=median_time, keep_partial=True)}
    systems = {}
    for name, model in models.items():
        sim = fs.Simulation(algo, train, sampler=sampler, chunk_size=chunk_size,
                            progress=False, devices=model)
        t = time.perf_counter()
        sim.compile()
        systems[name] = (SimulationRounds(sim), time.perf_counter() - t)
        print(f"{name}: compiled in {systems[name][1]:.1f} s", flush=True)
    for run, _ in systems.values():
        run()  # warm-up
    times = {name: [] for name in systems}
    steps = {name: [] for name in systems}
    for _ in range(rounds):
        for name, (run, _) in systems.items():
            t = time.perf_counter()
            record = run()
            times[name].append(time.perf_counter() - t)
            steps[name].append(sum(record["clients"]["num_steps"]))
    for run, _ in systems.values():
        run.close()
    base = statistics.median(times["no device model"])
    return [{"system": name, "s_per_round": statistics.median(ts),
             "ratio": statistics.median(ts) / base, "compile_s": systems[name][1],
             "local_steps": statistics.median(steps[name]), "rounds": ts,
             "deadline_s": None if models[name] is None else models[name].deadline}
            for name, ts in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cohort", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=8)
    args = parser.parse_args()
    no_caches()
    plans = [plan_cost(n, 5 if args.quick else 20)
             for n in ((1000, 10_000) if args.quick else (1000, 100_000))]
    print(json.dumps(plans), flush=True)
    cohort = args.cohort or (200 if args.quick else 1000)
    rows = rounds_with_devices(cohort, args.rounds or (3 if args.quick else 11),
                               args.chunk_size)
    human, slug = machine_name()
    load = os.getloadavg()
    meta = {"machine": human, "date": dt.date.today().isoformat(), "jax": jax.__version__,
            "loadavg_1_5_15": load, "cpus": os.cpu_count()}
    out = Path(__file__).resolve().parent / "results" / (
        f"device_model-{slug}{'-quick' if args.quick else ''}")
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "plans": plans, "rounds": rows}, indent=1))
    lines = [f"# The device model's cost ({human}, {meta['date']}, jax {jax.__version__}; "
             f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()}"
             " CPUs)", "",
             "A round's plan on the host (cohort 1%, over-selection 1.3, diurnal availability, "
             "10% dropout, deadline with partial work), median:", ""]
    lines += [f"- {p['clients']:,} clients (cohort {p['cohort']:,}): {p['plan_ms']:.2f} ms"
              for p in plans]
    lines += ["", f"W1 at {cohort:,} clients, K = {args.chunk_size}, median of interleaved "
              "rounds:", "",
              "| system | s/round | ratio | local steps |", "|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['s_per_round']:.3f} | {r['ratio']:.2f} | "
              f"{r['local_steps']:,.0f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
