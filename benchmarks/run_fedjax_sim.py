"""fedjax_sim on one benchmark workload: prints one RESULT line (see workloads.py).

  python benchmarks/run_fedjax_sim.py --workload W1 --cohort 1000 [--chunk-size K] [--devices N]

Without --chunk-size, K is chosen as `fs.simulate(chunk_size=None)` chooses it
(`choose_chunk_size`, timed as `autotune_s`). Rounds run as `fs.simulate` runs them: dispatch
round r, pack the cohort of round r+1 on the host meanwhile, fetch the metrics, wait for the
state. The round program is compiled ahead of time (`compile_s`); a second compilation during
the timed rounds is reported (`recompiled`). `--devices N` on a CPU splits the host into N XLA
devices and shards the cohort over them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
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
from fedjax_sim import chunk_size as sim_chunks  # noqa: E402
from fedjax_sim import engine as engine_lib  # noqa: E402
from fedjax_sim import (
    rounds,  # noqa: E402
    sampling,  # noqa: E402
)

# XLA compiles seen (the timed rounds must add none): counted by JAX's own compile event, as a
# PRNG key carried in the state adds jit cache entries for one executable.
COMPILES: list[float] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: COMPILES.append(secs)
    if event == "/jax/core/compile/backend_compile_duration" else None)


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

    w = WORKLOADS[args.workload]
    algo, train = build(w, args.cohort)
    mesh = fs.client_mesh() if jax.device_count() > 1 else None
    resident = train.nbytes <= rounds.resident_limit()
    pool = rounds.resident_pool(train, mesh) if resident else None
    params = algo.model.init(jax.random.key(SEED))
    indices = sampling.sample_cohort(train.num_clients, args.cohort, SEED, 0)

    autotune_s = autotune_peak_mb = None
    k = args.chunk_size
    if k is None:
        state1 = engine_lib.replicate(algo.init(params, jax.random.key(SEED)),
                                      fs.Engine(1, mesh))
        t = time.perf_counter()
        k = sim_chunks.choose_chunk_size(algo, train, args.cohort, state1, indices, seed=SEED,
                                  mesh=mesh, pool=pool)
        autotune_s = time.perf_counter() - t
        jax.clear_caches()  # compile_s below is then a cold compile of the chosen program
        # The search runs wider programs than the chosen one: its peak is reported apart.
        autotune_peak_mb = peak_host_mb()
        if not reset_peak_host_mb():
            autotune_peak_mb = None

    engine = fs.Engine(k, mesh)
    state = engine_lib.replicate(algo.init(params, jax.random.key(SEED)), engine)
    runner = rounds.RoundRunner(algo, train, args.cohort, engine, SEED, pool)
    packed = runner.pack(indices, 0)
    t = time.perf_counter()
    compiled = runner.lower(state, None, packed).compile()
    compile_s = time.perf_counter() - t
    runner.compiled = compiled
    mem = compiled.memory_analysis()

    box = {"state": state, "packed": packed, "r": 0, "loss": None}

    def run_round():
        box["state"], _, metrics = runner(box["state"], None, box["packed"])
        box["r"] += 1
        box["packed"] = runner.pack(sampling.sample_cohort(train.num_clients, args.cohort, SEED,
                                                      box["r"]), box["r"])
        box["loss"] = float(metrics.train_loss)
        jax.block_until_ready(box["state"])

    compiles_before = len(COMPILES)
    timing = time_rounds(run_round, args.rounds, min_seconds=args.min_seconds)
    recompiled = len(COMPILES) > compiles_before
    x, y = (v[:w.batch_size] for v in client_data(w, 1))
    plain_s = plain_steps_s(w, algo.model, engine_lib.replicate(params, engine),
                            engine_lib.replicate({"x": x, "y": y}, engine), args.cohort, mesh)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    result_line({
        "system": "fedjax_sim", "workload": w.name, "cohort": args.cohort, **timing,
        "compile_s": compile_s, "autotune_s": autotune_s,
        "autotune_peak_mem_mb": autotune_peak_mb, "chunk_size": k,
        "devices": jax.device_count(), "padded_cohort": runner.shape.size,
        "resident": resident, "recompiled": recompiled,
        "temp_mb": None if mem is None else mem.temp_size_in_bytes / 2**20,
        "device_peak_mem_mb": (stats["peak_bytes_in_use"] / 2**20
                               if stats and "peak_bytes_in_use" in stats else None),
        "final_train_loss": box["loss"], "plain_steps_s": plain_s,
        "jax_version": jax.__version__,
    })


if __name__ == "__main__":
    main()
