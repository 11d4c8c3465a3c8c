"""fedjax_sim on one benchmark workload: prints one RESULT line (see workloads.py).

  python benchmarks/run_fedjax_sim.py --workload W1 --cohort 1000 [--chunk-size K] [--devices N]

Everything goes through fedjax_sim's public API: a `fs.Simulation` runs the rounds, as
`fs.simulate` does (`SimulationRounds`: round r+1 is packed on a background thread while
`sim.step` runs round r). Without --chunk-size, K is chosen as `fs.simulate(chunk_size=None)`
chooses it: a `Simulation` built with `chunk_size=None` runs the search (`autotune_s`, its
`timings["chunk_size_choice_s"]`); the timed run is then a fresh `Simulation` at that K, after
`jax.clear_caches()`, so that `compile_s` is a cold compile of the chosen program. The round
program compiles before any round (`sim.memory_analysis()`, which also gives `temp_mb`; its
`timings["compile_s"]`); the first round is the warm-up (`first_round_s`); a compilation
during the timed rounds is reported (`recompiled`). fedjax_sim's caches
of earlier runs (the chosen K, compiled programs: `FEDJAX_SIM_CACHE_DIR`) are off, so every run
searches and compiles. `--devices N` on a CPU splits the host into N XLA devices and shards the
cohort over them.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import (  # noqa: E402
    SEED,
    WORKLOADS,
    client_data,
    driver_parser,
    peak_host_mb,
    reset_peak_host_mb,
    result_line,
    time_rounds,
)

import fedjax_sim as fs  # noqa: E402

# XLA compiles seen (the timed rounds must add none): counted by JAX's own compile event, as a
# PRNG key carried in the state adds jit cache entries for one executable.
COMPILES: list[float] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: COMPILES.append(secs)
    if event == "/jax/core/compile/backend_compile_duration" else None)

def no_caches() -> None:
    """Turns off fedjax_sim's caches of earlier runs (the chunk-size choice and JAX's
    persistent compilation cache): a benchmark times the search and a cold compile."""
    os.environ["FEDJAX_SIM_CACHE_DIR"] = ""


class SimulationRounds:
    """Rounds of a `fs.Simulation` as `Simulation.run` runs them: round r+1 is sampled, read
    and packed (`sim.pack`, and accounted) on a background thread while `sim.step` runs
    round r. A call runs one round and returns once it is done (`step` fetches the round's
    record to the host; the state is waited for too). The first round's inputs are packed
    before the first call."""

    def __init__(self, sim: fs.Simulation):
        self.sim = sim
        self.prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-prefetch")
        self.upcoming = self.prefetch.submit(self._prepare, sim.round)
        self.upcoming.result()
        self.record: dict | None = None
        self.padded_cohort: int | None = None

    def __call__(self) -> dict:
        packed = self.upcoming.result()
        self.padded_cohort = int(packed.cohort.client_ids.shape[0])
        self.upcoming = self.prefetch.submit(self._prepare, self.sim.round + 1)
        self.record = self.sim.step(packed)
        jax.block_until_ready(self.sim.state)
        return self.record

    def _prepare(self, round_num: int):
        """The round's inputs and, with a DP chain, its epsilon (off the critical path, as
        `Simulation.run` accounts it)."""
        if self.sim.ledger is not None:
            self.sim.ledger.epsilon(round_num + 1)
        return self.sim.pack(round_num)

    def close(self) -> None:
        self.prefetch.shutdown(wait=True, cancel_futures=True)


def interleaved_rounds(algorithms: dict, train, sampler, chunk_size: int,
                       rounds: int) -> list[dict]:
    """Seconds per round of each algorithm's `fs.Simulation` on `train`, side by side: all
    compiled, a warm-up round of each, then `rounds` rounds of each in turn (load from other
    processes falls on all alike). Rows: system, the median `s_per_round`, its `ratio` to the
    first system's, `compile_s` and every round's time."""
    systems = {}
    for name, algo in algorithms.items():
        sim = fs.Simulation(algo, train, sampler=sampler, chunk_size=chunk_size,
                            progress=False)
        t = time.perf_counter()
        sim.compile()
        systems[name] = (SimulationRounds(sim), time.perf_counter() - t)
        print(f"{name}: compiled in {systems[name][1]:.1f} s", flush=True)
    for run, _ in systems.values():
        run()  # warm-up
    times = {name: [] for name in systems}
    for _ in range(rounds):
        for name, (run, _) in systems.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    for run, _ in systems.values():
        run.close()
    base = statistics.median(next(iter(times.values())))
    return [{"system": name, "s_per_round": statistics.median(ts),
             "ratio": statistics.median(ts) / base, "compile_s": systems[name][1],
             "rounds": ts} for name, ts in times.items()]


def build_model(w):
    if w.model == "mlp":
        return fs.models.mlp(784, w.num_classes, hidden=(200,))
    if w.model == "logistic":
        return fs.models.logistic_regression(784, w.num_classes)
    if w.model == "cnn":
        return fs.models.emnist_cnn(w.num_classes)
    return fs.models.char_lstm(w.num_classes)


def build(w, cohort: int):
    """(algorithm, population): the workload's FedAvg and a population of `cohort` clients."""
    x, y = client_data(w, cohort)
    train = fs.data.from_arrays(np.repeat(np.arange(cohort), w.examples_per_client),
                                {"x": x, "y": y})
    algo = fs.algorithms.fedavg(build_model(w), optax.sgd(w.client_lr),
                                optax.sgd(w.server_lr), batch_size=w.batch_size,
                                num_epochs=w.epochs)
    return algo, train


def plain_steps(w, model, cohort: int, mesh):
    """The round's local steps alone, jitted: `(params, batch) -> params[devices, ...]`, each
    device running its share of cohort x steps-per-client plain SGD steps of the model on one
    fixed batch, one client at a time (no vmap), in one compiled loop. No per-client state,
    data gather, masking, finiteness check or aggregation: what a round's training costs with
    nothing federated around it."""
    devices = 1 if mesh is None else mesh.shape["clients"]
    n = -(-cohort * w.steps_per_client // devices)
    key = jax.random.key(0)  # the benchmark models have no dropout

    def steps(params, batch):
        def body(_, p):
            g = jax.grad(lambda p: jnp.mean(model.loss(p, batch, key)))(p)
            return jax.tree.map(lambda a, b: a - w.client_lr * b, p, g)

        return jax.tree.map(lambda a: a[None], lax.fori_loop(0, n, body, params))

    return jax.jit(steps if mesh is None else jax.shard_map(
        steps, mesh=mesh, in_specs=(P(), P()), out_specs=P("clients"), check_vma=False))


def replicated(tree, mesh):
    """`tree` on the default device, or on every device of `mesh`."""
    return jax.device_put(tree, None if mesh is None else NamedSharding(mesh, P()))


def plain_steps_s(w, model, params, batch, cohort: int, mesh) -> float:
    """Seconds for `plain_steps`, best of 3 after a warm-up: the reference a round's time
    is set against (small per-step matmuls run well below the device's large-matmul rate)."""
    f = plain_steps(w, model, cohort, mesh)
    return time_rounds(lambda: jax.block_until_ready(f(params, batch)), 3)["s_per_round_min"]


def main(argv=None) -> None:
    p = driver_parser(__doc__.split("\n")[0])
    p.add_argument("--chunk-size", type=int, help="K; default: chosen by timing (autotune)")
    p.add_argument("--devices", type=int, default=1,
                   help="XLA host devices to shard the cohort over (CPU only)")
    args = p.parse_args(argv)
    if args.devices > 1:
        jax.config.update("jax_num_cpu_devices", args.devices)  # before JAX's backend starts
    no_caches()

    w = WORKLOADS[args.workload]
    algo, train = build(w, args.cohort)
    mesh = fs.client_mesh() if jax.device_count() > 1 else None

    def simulation(chunk_size):
        return fs.Simulation(algo, train, cohort_size=args.cohort, seed=SEED,
                             chunk_size=chunk_size, mesh=mesh, progress=False)

    autotune_s = autotune_peak_mb = None
    k = args.chunk_size
    if k is None:
        search = simulation(None)
        k, autotune_s = search.chunk_size, search.timings["chunk_size_choice_s"]
        del search  # its compiled candidates and device copy of the population
        gc.collect()
        jax.clear_caches()  # compile_s below is then a cold compile of the chosen program
        # The search runs wider programs than the chosen one: its peak is reported apart.
        autotune_peak_mb = peak_host_mb()
        if not reset_peak_host_mb():
            autotune_peak_mb = None

    sim = simulation(k)
    memory = sim.memory_analysis()  # compiles the round program (timings["compile_s"])
    run_round = SimulationRounds(sim)
    t = time.perf_counter()
    run_round()  # the warm-up
    timing_first_s = time.perf_counter() - t
    compile_s = sim.timings["compile_s"]

    compiles_before = len(COMPILES)
    timing = time_rounds(run_round, args.rounds, warmup=0, min_seconds=args.min_seconds)
    timing["first_round_s"] = timing_first_s
    recompiled = len(COMPILES) > compiles_before
    run_round.close()
    x, y = (v[:w.batch_size] for v in client_data(w, 1))
    params = algo.model.init(jax.random.key(SEED))
    plain_s = plain_steps_s(w, algo.model, replicated(params, mesh),
                            replicated({"x": x, "y": y}, mesh), args.cohort, mesh)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    result_line({
        "system": "fedjax_sim", "workload": w.name, "cohort": args.cohort, **timing,
        "compile_s": compile_s, "autotune_s": autotune_s,
        "autotune_peak_mem_mb": autotune_peak_mb, "chunk_size": k,
        "devices": jax.device_count(), "padded_cohort": run_round.padded_cohort,
        "resident": sim.resident, "recompiled": recompiled,
        "temp_mb": memory.temp_size_in_bytes / 2**20 if memory else None,
        "device_peak_mem_mb": (stats["peak_bytes_in_use"] / 2**20
                               if stats and "peak_bytes_in_use" in stats else None),
        "final_train_loss": run_round.record["train_loss"], "plain_steps_s": plain_s,
        "jax_version": jax.__version__,
    })


if __name__ == "__main__":
    main()
