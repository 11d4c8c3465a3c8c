"""The simulation loop: sample a cohort, pack it, run the compiled round, evaluate, record.

Every random choice derives from one seed: the cohort of round r from (seed, r), the shuffles
from (seed, r, client id), the training keys from fold_in(fold_in(key(seed), r), client id).
So a run is reproducible whatever the chunk size or device count (to float summation order).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from fedjax_sim import chunk_cache
from fedjax_sim.algorithms.base import FederatedAlgorithm, ServerState, tree_norm
from fedjax_sim.checks import (
    check_bool,
    check_data,
    check_eval_clients,
    check_integer,
    check_mesh,
    check_model_fits,
    check_not_empty,
    check_output_dir,
    check_some_client_trains,
)
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.data.storage import is_in_memory
from fedjax_sim.engine import Engine, replicate
from fedjax_sim.evaluation import Evaluator
from fedjax_sim.health import DivergedError, Monitor
from fedjax_sim.rounds import RoundRunner, new_store

# On a CPU, a population up to this size stays on the device and cohorts are gathered there
# (the device copy is a second copy in host memory); on an accelerator, up to a quarter of
# its memory (`resident_limit`).
RESIDENT_BYTES = 2 << 30


def resident_limit() -> int:
    """The largest in-memory population `simulate` keeps on the device by default."""
    memory = device_memory()
    return memory // 4 if memory else RESIDENT_BYTES


def device_memory() -> int | None:
    """The memory an accelerator's allocator may use, or None where the device reports no
    limit (a CPU)."""
    device = jax.local_devices()[0]  # memory_stats() fails on another process's device
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


@dataclasses.dataclass
class SimulationResult:
    """What `simulate` returns.

    Attributes:
      params: the final server params.
      state: the final server state (params, optimizer and aggregator state, round).
      history: one dict per round: "round", "wall_time", "train_loss" (NaN when every
        client was excluded), "num_included", "num_excluded", "excluded_clients",
        "update_norm" and "params_norm" (the server's), "outlier_clients" (clients whose
        update norm is far above the cohort's, `health.outliers`), "chunk_size",
        "step_efficiency" (useful over executed local steps: a vmapped chunk runs to its
        longest client), "clients" (per-client train metrics and update norms), and on
        evaluation rounds "eval" (summary) and "eval_clients" (per-client metrics).
      chunk_size: the vectorization width K used.
      chunk_size_source: "given" (passed in), "cache" (an earlier run's choice for the same
        program on the same devices) or "search" (timed on the first cohort).
      timings: seconds spent in "chunk_size_choice_s" (the cache lookup, or the search and
        its compiles), "compile_s" (the round program; 0 when the search compiled it),
        "rounds_s" (the rounds, evaluation apart), "eval_s" (evaluation, its compile
        included) and "total_s".
    """

    params: Any
    state: ServerState
    history: list[dict]
    chunk_size: int
    chunk_size_source: str = "given"
    timings: dict = dataclasses.field(default_factory=dict)


def sample_cohort(num_clients: int, cohort_size: int, seed: int, round_num: int) -> np.ndarray:
    """Population positions of round `round_num`'s cohort: uniform, without replacement."""
    if cohort_size > num_clients:
        raise ValueError(
            f"cohort_size {cohort_size} is larger than the population of {num_clients} clients")
    rng = np.random.default_rng([seed, round_num])
    return rng.choice(num_clients, cohort_size, replace=False)


def resident_pool(data: FederatedData, mesh: jax.sharding.Mesh | None) -> dict[str, jax.Array]:
    """The population's features on every device (then cohorts are gathered there): placed
    once per run and shared by every chunk size's program."""
    return replicate(data.features, Engine(1, mesh))


def chunk_candidates(per_device: int) -> list[int]:
    """Powers of two up to the per-device cohort, and the per-device cohort itself."""
    out, k = [], 1
    while k < per_device:
        out.append(k)
        k *= 2
    return out + [per_device]


def choose_chunk_size(algorithm, data, cohort_size, state, indices, *, seed, mesh, pool,
                      store=None, candidates=None, memory_budget=None, repeats=1) -> int:
    """Times vectorization widths K on the first cohort and returns the fastest (see
    `search_chunk_size`)."""
    return search_chunk_size(algorithm, data, cohort_size, state, indices, seed=seed,
                             mesh=mesh, pool=pool, store=store, candidates=candidates,
                             memory_budget=memory_budget, repeats=repeats)[0]


def search_chunk_size(algorithm, data, cohort_size, state, indices, *, seed, mesh, pool,
                      store=None, candidates=None, memory_budget=None,
                      repeats=1) -> tuple[int, RoundRunner]:
    """Times vectorization widths K on the first cohort; returns the fastest and its runner,
    compiled (the run reuses it rather than compile it again).

    Time per round falls with K while vmapping amortizes per-step overhead, then rises once
    per-client batched matmuls or memory traffic dominate (measured on a 2-core CPU with a
    784-200-10 MLP: K = 1 to 8 best, K = C 2x slower; accelerators favour far wider K).
    Candidates (`chunk_candidates`) are compiled and timed by `autotune`; one whose compiled
    program needs more than `memory_budget` bytes of temporaries (XLA's own memory analysis)
    ends the search. Every candidate shares `pool` (`RoundRunner`), and a cohort is packed
    for each timed run rather than kept per candidate: a host-packed cohort can be large.
    """
    devices = 1 if mesh is None else mesh.shape["clients"]
    if candidates is None:
        candidates = chunk_candidates(-(-cohort_size // devices))
    if memory_budget is None:
        memory_budget = _memory_budget()
    runners = {}

    def build(k):
        runner = runners[k] = RoundRunner(algorithm, data, cohort_size, Engine(k, mesh), seed,
                                          pool)
        runner.compile(state, store, runner.pack(indices, 0))
        mem = runner.compiled.memory_analysis()
        return mem is None or mem.temp_size_in_bytes <= memory_budget

    def seconds(k):
        runner = runners[k]
        packed = jax.block_until_ready(runner.pack(indices, 0))
        t = time.perf_counter()
        jax.block_until_ready(runner(state, store, packed))
        return time.perf_counter() - t

    k = autotune(sorted(candidates), build, seconds, repeats=repeats)
    return k, runners.get(k) or RoundRunner(algorithm, data, cohort_size, Engine(k, mesh),
                                            seed, pool)


def cached_chunk_size(algorithm, data, cohort_size, state, indices, *, seed, mesh,
                      pool, store=None) -> tuple[int, str, RoundRunner | None]:
    """(K, "cache" or "search", the search's compiled runner or None): the K an earlier run
    chose for this very program on these devices (`chunk_cache`), else the search's choice,
    which is then stored. So the same call gives the same K, and the same bits, run after
    run."""
    devices = 1 if mesh is None else mesh.shape["clients"]
    runner = RoundRunner(algorithm, data, cohort_size, Engine(1, mesh), seed, pool)
    key = chunk_cache.program_key(
        runner.lower(state, store, runner.pack(indices, 0)).as_text(), devices)
    k = process0_decides((chunk_cache.load(key) if jax.process_index() == 0 else None) or 0)
    if k:
        return k, "cache", None
    k, searched = search_chunk_size(algorithm, data, cohort_size, state, indices, seed=seed,
                                    mesh=mesh, pool=pool, store=store)
    if jax.process_index() == 0:
        chunk_cache.store(key, k, {"cohort_size": cohort_size, "devices": devices})
    return k, "search", searched


def autotune(candidates, build, seconds, *, repeats=1, give_up=2.0) -> int:
    """The candidate with the fastest timed run: `build(k)` prepares candidate k and says
    whether it fits; `seconds(k)` times one run of it.

    A sweep times each candidate once in order, stopping before the first that does not fit
    and after the first over `give_up` x the best so far. Then the candidates within
    `give_up` x the sweep's best are timed `repeats` more times, round robin, and each is
    scored by its fastest run (one more run each by default: with two, W3's 100-client
    search took 785 s on a 2-core CPU, against 498 s for two back-to-back runs each).
    Timing round robin rather than one candidate after another matters on a shared
    machine, where a slow spell lasting seconds would otherwise land on one candidate only
    (on a 2-core CPU, back-to-back timing once picked K = 1 for a 1,000-client logistic
    regression round, which runs 1.2-1.6x as long as K = 8).
    Every decision is process 0's, so all processes run the same programs.
    """
    times: dict[int, list[float]] = {}
    for k in candidates:
        if not process0_decides(build(k)):
            break
        times[k] = [seconds(k)]
        best = min(t[0] for t in times.values())
        if process0_decides(times[k][0] > give_up * best):
            break
    if not times:
        return candidates[0]
    best = min(t[0] for t in times.values())
    contenders = [k for k in times if process0_decides(times[k][0] <= give_up * best)]
    for _ in range(repeats):
        for k in contenders:
            times[k].append(seconds(k))
    return process0_decides(min(contenders, key=lambda k: min(times[k])))


def process0_decides(value: int) -> int:
    """Process 0's value on every process. Every choice of which programs run (and so which
    collectives) must agree across processes, or their collectives mismatch and hang; local
    timings and memory budgets differ between processes."""
    if jax.process_count() == 1:
        return int(value)
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _memory_budget() -> int:
    memory = device_memory()
    if memory:
        return int(memory * 0.6)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.25)


def _to_host(tree):
    """Fetches a pytree of (possibly global) arrays to numpy.

    Multi-process, an array split over the mesh (per-client metrics are sharded over
    "clients") spans other processes' devices: it is all-gathered first, a collective every
    process reaches at the same point since all run the same loop.
    """
    def get(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree.map(get, tree)


def simulate(
    algorithm: FederatedAlgorithm,
    train: FederatedData,
    *,
    rounds: int,
    cohort_size: int,
    seed: int = 0,
    params: Any = None,
    eval_data: FederatedData | None = None,
    eval_every: int = 0,
    eval_clients: int | None = None,
    eval_batch_size: int = 64,
    chunk_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    resident: bool | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> SimulationResult:
    """Runs `rounds` rounds of `algorithm` on cohorts of `cohort_size` clients of `train`.

    Args:
      algorithm: e.g. `fs.algorithms.fedavg(...)`.
      train: the training population.
      rounds: number of rounds.
      cohort_size: clients per round, sampled uniformly without replacement each round.
      seed: the one seed every random choice derives from.
      params: initial params; default `algorithm.model.init(key(seed))`.
      eval_data: population to evaluate on every `eval_every` rounds and after the last.
      eval_clients: evaluate on this many clients of `eval_data` (a fixed seeded sample).
      chunk_size: the vectorization width K. None: the K an earlier run chose for the same
        round program on the same devices (`chunk_cache`), else the fastest of a few timed
        on the first cohort (then kept for the next run). The K used is in the result and
        every history record: passing it reproduces the run.
      mesh: a mesh with a "clients" axis (`fs.client_mesh()`) to split cohorts over devices.
      resident: keep `train` on the device; default when it is in memory and takes under
        2 GiB on a CPU, or under a quarter of an accelerator's memory (`resident_limit`).
        Otherwise each round reads its cohort's rows (from memory, a memory-mapped file or
        SQLite), on a background thread while the previous round runs.
      output_dir: where `history.jsonl` (one line per round, written as the run goes) goes.
      progress: show a tqdm progress bar with rounds/s and the latest metrics.

    Returns:
      A `SimulationResult`.
    """
    if not isinstance(algorithm, FederatedAlgorithm):
        raise TypeError(f"algorithm must be a FederatedAlgorithm (e.g. fs.algorithms.fedavg("
                        f"model, optax.sgd(0.1))), got {type(algorithm).__name__}")
    train = check_not_empty(check_data("train", train), "train")
    rounds = check_integer("rounds", rounds, 0)
    cohort_size = check_integer("cohort_size", cohort_size, 1)
    # JAX keys take 32 bits of a seed without x64: 2**32 would train as seed 0 does.
    seed = check_integer("seed", seed, 0, 2**32 - 1)
    progress = check_bool("progress", progress)
    if resident is not None:
        resident = check_bool("resident", resident)
    check_mesh(mesh)
    eval_every = check_integer("eval_every", eval_every, 0)
    eval_batch_size = check_integer("eval_batch_size", eval_batch_size, 1)
    if cohort_size > train.num_clients:
        raise ValueError(
            f"cohort_size {cohort_size} is larger than the population of {train.num_clients} "
            "clients")
    if eval_data is not None:
        eval_data = check_not_empty(check_data("eval_data", eval_data), "eval_data")
    elif eval_every or eval_clients is not None:
        raise ValueError(f"{'eval_every' if eval_every else 'eval_clients'} is set but no "
                         "eval_data was given")
    if eval_clients is not None:
        check_eval_clients(eval_clients, eval_data, "eval_clients")
    devices = 1 if mesh is None else mesh.shape["clients"]
    if chunk_size is not None:
        per_device = -(-cohort_size // devices)
        if check_integer("chunk_size", chunk_size, 1) > per_device:
            raise ValueError(
                f"chunk_size {chunk_size} is larger than the {per_device} client(s) per device "
                f"(cohort {cohort_size} over {devices} device(s)): the rest of every chunk would "
                f"be padding; use chunk_size <= {per_device}")
    if output_dir is not None:
        output_dir = check_output_dir(output_dir)
    if params is None:
        try:
            params = algorithm.model.init(jax.random.key(seed))
        except TypeError as e:
            raise TypeError(f"model.init(key) failed ({e}): a Model's init takes one PRNG key "
                            "and returns the params") from e
    if resident is None:
        resident = is_in_memory(train) and train.nbytes <= resident_limit()
    check_model_fits(algorithm.model, train, params, algorithm.batching.resolve_batch_size(train),
                     finite=resident)
    check_some_client_trains(algorithm.batching, train)
    state = algorithm.init(params, jax.random.key(seed))
    monitor = Monitor(sum(int(np.size(x)) for x in jax.tree.leaves(params)),
                      float(tree_norm(state.params)))

    timings = {"chunk_size_choice_s": 0.0, "compile_s": 0.0, "rounds_s": 0.0, "eval_s": 0.0}
    start = time.perf_counter()
    state = replicate(state, Engine(1, mesh))
    store = new_store(algorithm, train, params, Engine(1, mesh))
    pool = resident_pool(train, mesh) if resident else None
    source, runner = "given", None
    if chunk_size is None:
        chunk_size, source, runner = cached_chunk_size(
            algorithm, train, cohort_size, state,
            sample_cohort(train.num_clients, cohort_size, seed, 0), seed=seed, mesh=mesh,
            pool=pool, store=store)
        timings["chunk_size_choice_s"] = time.perf_counter() - start
    if runner is None or store is not None:  # a store's buffers are donated round to round
        runner = RoundRunner(algorithm, train, cohort_size, Engine(chunk_size, mesh), seed,
                             pool, donate=store is not None)
    evaluator = None
    if eval_data is not None:  # checked against the params now, not after the training
        evaluator = Evaluator(algorithm.model, eval_data, batch_size=eval_batch_size,
                              num_clients=eval_clients, engine=Engine(1, mesh), seed=seed,
                              name="eval_data")
        evaluator.check(params)

    def pack(r):
        return runner.pack(sample_cohort(train.num_clients, cohort_size, seed, r), r)

    history: list[dict] = []
    sink = None
    if output_dir is not None:
        if (output_dir / "history.jsonl").exists():
            warnings.warn(f"output_dir {str(output_dir)!r} holds an earlier run's "
                          "history.jsonl; this run overwrites it", stacklevel=2)
        sink = open(output_dir / "history.jsonl", "w")  # noqa: SIM115 - closed below
    # Round r+1's cohort is sampled, read and packed on a background thread while round r runs.
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedjax_sim-prefetch")

    def result():
        timings["total_s"] = time.perf_counter() - start
        return SimulationResult(params=_to_host(state.params), state=state, history=history,
                                chunk_size=chunk_size, chunk_size_source=source,
                                timings=dict(timings))

    try:
        upcoming = prefetch.submit(pack, 0) if rounds else None
        if rounds and runner.compiled is None:  # a search's winner is compiled already
            timings["compile_s"] = runner.compile(state, store, upcoming.result())
        loop_start = time.perf_counter()
        bar = tqdm(range(rounds), desc="rounds", unit="round", disable=not progress)
        for r in bar:
            packed = upcoming.result()
            if r + 1 < rounds:
                upcoming = prefetch.submit(pack, r + 1)
            state, store, metrics = runner(state, store, packed)
            record = _round_record(r, metrics, train, time.perf_counter() - start, chunk_size)
            monitor.check(record)
            if evaluator is not None and ((eval_every and (r + 1) % eval_every == 0)
                                          or r + 1 == rounds):
                eval_start = time.perf_counter()
                ev = evaluator(state.params)
                timings["eval_s"] += time.perf_counter() - eval_start
                record["eval"] = ev.summary
                record["eval_clients"] = {k: v.tolist() for k, v in ev.clients.items()}
            history.append(record)
            if sink is not None:
                sink.write(json.dumps({k: v for k, v in record.items()
                                       if k not in ("clients", "eval_clients")}) + "\n")
                sink.flush()
            if monitor.stuck:
                raise monitor.stuck
            postfix = {"loss": f"{record['train_loss']:.4f}"}
            if "eval" in record and "accuracy" in record["eval"]:
                postfix["acc"] = f"{record['eval']['accuracy']['weighted_mean']:.3f}"
            bar.set_postfix(postfix, refresh=False)
        timings["rounds_s"] = time.perf_counter() - loop_start - timings["eval_s"]
    except DivergedError as e:
        e.result = result()
        raise
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
        if sink is not None:
            sink.close()
    return result()


def step_efficiency(num_steps: np.ndarray, chunk_size: int) -> float:
    """Useful local steps over executed ones: a vmapped chunk runs to its longest client."""
    steps = np.asarray(num_steps, np.int64).reshape(-1, chunk_size)
    executed = int(steps.max(axis=1).sum()) * chunk_size
    return float(steps.sum() / executed) if executed else 1.0


def _round_record(r: int, metrics, data: FederatedData, wall_time: float,
                  chunk_size: int) -> dict:
    m = _to_host(metrics)
    ids = m.clients["client_ids"]
    real = ids < data.num_clients
    clients = {k: v[real].tolist() for k, v in m.clients.items() if k != "client_ids"}
    clients["client_id"] = data.client_ids[ids[real]].tolist()
    excluded = data.client_ids[ids[real & ~m.clients["finite"]]].tolist()
    return {
        "round": r,
        "wall_time": wall_time,
        "train_loss": float(m.train_loss),
        "num_included": int(m.num_included),
        "num_excluded": int(m.num_excluded),
        "excluded_clients": excluded,
        "update_norm": float(m.update_norm),
        "params_norm": float(m.params_norm),
        "chunk_size": chunk_size,
        "step_efficiency": step_efficiency(m.clients["num_steps"], chunk_size),
        "server": {k: float(v) for k, v in m.server.items()},
        "clients": clients,
    }
