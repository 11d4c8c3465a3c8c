"""FedBuff's client throughput against synchronous FedAvg's (issue 19), side by side in one run.

W1 (MLP 784-200-10, 64 examples a client, batch 16, 1 epoch) at 1,000 clients' concurrency:
synchronous FedAvg with a cohort of all 1,000 (`fs.Simulation`, the next round packed on a
background thread) against FedBuff (`fs.asynchronous.AsyncSimulation`, the next aggregation
packed the same way) with buffers of K = 1000 and K = 100, on a seeded log-normal device model
(so K = 100 trains from many versions at once: its version stack and staleness are real).
Both at the same fixed chunk size. Interleaved: one FedAvg round, one K = 1000 aggregation,
ten K = 100 aggregations in turn, so each system trains 1,000 clients per turn and load from
other processes falls on all alike. Throughput = clients trained per wall second, the median
turn; the issue's goal is FedBuff >= 0.8x FedAvg.

  python benchmarks/fedbuff.py            # ~3 min on a 2-core CPU
  python benchmarks/fedbuff.py --quick    # smaller, for a smoke test

Writes `benchmarks/results/fedbuff-<machine>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core import machine_name  # noqa: E402
from privacy import every_client  # noqa: E402
from run_fedjax_sim import SimulationRounds, build, build_model, no_caches  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

import fedjax_sim as fs  # noqa: E402


class AsyncRounds:
    """`n` aggregations of an `AsyncSimulation` per call, the next packed on a background
    thread while one runs (as `AsyncSimulation.run` does)."""

    def __init__(self, sim: fs.asynchronous.AsyncSimulation, per_call: int):
        self.sim, self.per_call = sim, per_call
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-async")
        self.upcoming = self.pool.submit(sim.pack, sim.aggregation)

    def __call__(self) -> None:
        for _ in range(self.per_call):
            packed = self.upcoming.result()
            self.upcoming = self.pool.submit(self.sim.pack, self.sim.aggregation + 1)
            self.sim.step(packed)
        jax.block_until_ready(self.sim.state)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def measure(clients: int, turns: int, chunk_size: int, buffers: tuple[int, ...]) -> dict:
    w = WORKLOADS["W1"]
    _, train = build(w, clients)
    model = build_model(w)
    opt, server = optax.sgd(w.client_lr), optax.sgd(w.server_lr)
    kw = dict(batch_size=w.batch_size, num_epochs=w.epochs, client_weighting="uniform")
    devices = fs.asynchronous.lognormal_devices(clients, seed=0)
    fedavg = fs.Simulation(fs.algorithms.fedavg(model, opt, server, **kw), train,
                           sampler=every_client(clients), chunk_size=chunk_size,
                           progress=False)
    t = time.perf_counter()
    fedavg.compile()
    systems = {"fedavg": (SimulationRounds(fedavg), clients, time.perf_counter() - t, None)}
    for k in buffers:
        per_call = clients // k
        algo = fs.algorithms.fedbuff(model, opt, server, buffer_size=k, **kw)
        sim = fs.asynchronous.AsyncSimulation(algo, train, devices, concurrency=clients,
                                              num_aggregations=per_call * (turns + 2),
                                              chunk_size=chunk_size)
        t = time.perf_counter()
        sim.step()  # compiles; also the first aggregation
        systems[f"fedbuff K={k}"] = (AsyncRounds(sim, per_call), clients,
                                     time.perf_counter() - t, sim)
    for run, *_ in systems.values():
        run()  # warm-up
    times = {name: [] for name in systems}
    for _ in range(turns):
        for name, (run, *_) in systems.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    rows = []
    base = clients / statistics.median(times["fedavg"])
    for name, (run, n, compile_s, sim) in systems.items():
        run.close()
        rate = n / statistics.median(times[name])
        row = {"system": name, "clients_per_turn": n, "s_per_turn": statistics.median(times[name]),
               "clients_per_s": rate, "ratio": rate / base, "compile_s": compile_s,
               "turns": times[name]}
        if sim is not None:
            done = sim.history
            row.update(version_slots=sim.plan.num_slots,
                       staleness_mean=statistics.mean(h["staleness_mean"] for h in done),
                       staleness_max=max(h["staleness_max"] for h in done))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "turns"}), flush=True)
    return {"clients": clients, "chunk_size": chunk_size, "turns": turns, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--turns", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=4)
    args = parser.parse_args()
    no_caches()
    clients = 200 if args.quick else 1000
    result = measure(clients, args.turns or (3 if args.quick else 9), args.chunk_size,
                     (clients, clients // 10))
    human, slug = machine_name()
    meta = {"machine": human, "date": dt.date.today().isoformat(), "jax": jax.__version__,
            "devices": len(jax.devices())}
    out = Path(__file__).resolve().parent / "results" / (
        f"fedbuff-{slug}{'-quick' if args.quick else ''}")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, **result}, indent=1))
    lines = [f"# FedBuff's client throughput ({human}, {meta['date']}, jax {jax.__version__})",
             "", f"W1 at {clients:,} clients' concurrency, chunk size {args.chunk_size}, one "
             f"device, the median of {result['turns']} interleaved turns of {clients:,} "
             "clients each:", "",
             "| system | s/turn | clients/s | ratio to fedavg | version slots | mean staleness |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['system']} | {r['s_per_turn']:.3f} | {r['clients_per_s']:,.0f} | "
                     f"{r['ratio']:.2f} | {r.get('version_slots', '-')} | "
                     f"{r.get('staleness_mean', 0):.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
