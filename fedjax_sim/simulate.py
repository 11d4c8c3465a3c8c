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
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from fedjax_sim.algorithms.base import FederatedAlgorithm, ServerState
from fedjax_sim.client import Engine, place_cohort, replicate
from fedjax_sim.data.cohort import Cohort, CohortShape, host_pool, pack_cohort, resident_order
from fedjax_sim.data.federated import FederatedData, check_labels, check_rows
from fedjax_sim.data.storage import is_in_memory
from fedjax_sim.evaluation import Evaluator

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
      history: one dict per round: "round", "wall_time", "train_loss", "num_included",
        "num_excluded", "excluded_clients", "step_efficiency" (useful over executed local
        steps: a vmapped chunk runs to its longest client), "clients" (per-client train
        metrics), and on
        evaluation rounds "eval" (summary) and "eval_clients" (per-client metrics).
      chunk_size: the vectorization width K used.
    """

    params: Any
    state: ServerState
    history: list[dict]
    chunk_size: int


def sample_cohort(num_clients: int, cohort_size: int, seed: int, round_num: int) -> np.ndarray:
    """Population positions of round `round_num`'s cohort: uniform, without replacement."""
    if cohort_size > num_clients:
        raise ValueError(
            f"cohort_size {cohort_size} is larger than the population of {num_clients} clients")
    rng = np.random.default_rng([seed, round_num])
    return rng.choice(num_clients, cohort_size, replace=False)


def check_model(algorithm: FederatedAlgorithm, data: FederatedData, params: Any,
                batch_size: int) -> None:
    """Fails early, with a clear message, on a model that does not fit the data."""
    model = algorithm.model
    if model.label is not None:
        check_labels(data, *model.label)
    b = min(batch_size, data.total_examples)
    sample = {k: v[:b] for k, v in data.features.items()}
    try:
        out = jax.eval_shape(model.loss, params, sample, jax.random.key(0))
    except Exception as e:  # noqa: BLE001 - re-raised with the context a user needs
        raise ValueError(f"model.loss failed on a batch of {b} examples with features "
                         f"{ {k: v.shape for k, v in sample.items()} }: {e}") from e
    if out.shape != (b,):
        raise ValueError(
            f"model.loss must return one value per example: shape ({b},) for a batch of {b}, "
            f"got {out.shape}")


def resident_pool(data: FederatedData, mesh: jax.sharding.Mesh | None) -> dict[str, jax.Array]:
    """The population's features on every device (then cohorts are gathered there): placed
    once per run and shared by every chunk size's program."""
    return replicate(data.features, Engine(1, mesh))


class RoundRunner:
    """Packs cohorts and runs the jitted round for one engine (one compiled program).

    `pool` is the population on the device(s) (`resident_pool`), or None to read each
    cohort's rows on the host.
    """

    def __init__(self, algorithm: FederatedAlgorithm, data: FederatedData, cohort_size: int,
                 engine: Engine, seed: int, pool: dict[str, jax.Array] | None):
        self.algorithm, self.data, self.engine, self.seed = algorithm, data, engine, seed
        self.pool = pool
        self.shape = CohortShape.for_population(data, algorithm.batching, cohort_size,
                                                engine.cohort_multiple)

        def round_fn(state, cohort, pool, round_num, *, batch_size, engine):
            # The round's key is derived inside the program: deriving and placing it from
            # the host cost milliseconds per round, a tenth of a small round on a CPU.
            key = jax.random.fold_in(jax.random.key(seed), round_num)
            return algorithm.round(state, cohort, pool, key, batch_size=batch_size,
                                   engine=engine)

        self.fn = jax.jit(round_fn, static_argnames=("batch_size", "engine"))

    def pack(self, indices: np.ndarray, round_num: int) -> tuple[Cohort, Any]:
        cohort, rows = pack_cohort(self.data, indices, self.algorithm.batching, self.shape,
                                   seed=self.seed, round_num=round_num,
                                   weighting=self.algorithm.client_weighting)
        if self.pool is not None:
            return place_cohort(resident_order(cohort, rows), self.engine), self.pool
        pool = host_pool(self.data, rows, self.shape)
        # A streamed population may be too large to check up front: check what is read.
        check_rows(self.data, rows, pool, self.algorithm.model.label)
        return place_cohort(cohort, self.engine), replicate(pool, self.engine)

    def lower(self, state, packed) -> jax.stages.Lowered:
        """The round program for these shapes, to compile ahead of time (call with the
        compiled program's `(state, *packed, np.int32(round_num))`)."""
        return self.fn.lower(state, *packed, np.int32(0), batch_size=self.shape.batch_size,
                             engine=self.engine)

    def __call__(self, state, packed, round_num: int):
        cohort, pool = packed
        return self.fn(state, cohort, pool, np.int32(round_num),
                       batch_size=self.shape.batch_size, engine=self.engine)


def chunk_candidates(per_device: int) -> list[int]:
    """Powers of two up to the per-device cohort, and the per-device cohort itself."""
    out, k = [], 1
    while k < per_device:
        out.append(k)
        k *= 2
    return out + [per_device]


def choose_chunk_size(algorithm, data, cohort_size, state, indices, *, seed, mesh, pool,
                      candidates=None, memory_budget=None, repeats=1) -> int:
    """Times vectorization widths K on the first cohort and returns the fastest.

    Time per round falls with K while vmapping amortizes per-step overhead, then rises once
    per-client batched matmuls or memory traffic dominate (measured on a 2-core CPU with a
    784-200-10 MLP: K = 1 to 8 best, K = C 2x slower; accelerators favour far wider K).
    Candidates (`chunk_candidates`) are compiled and timed by `autotune`; one whose compiled
    program needs more than `memory_budget` bytes of temporaries (XLA's own memory analysis)
    ends the search. The chosen program stays in JAX's compilation cache, so the run does not
    compile it again. Every candidate shares `pool` (`RoundRunner`), and a cohort is packed
    for each timed run rather than kept per candidate: a host-packed cohort can be large.
    """
    devices = 1 if mesh is None else mesh.shape["clients"]
    if candidates is None:
        candidates = chunk_candidates(-(-cohort_size // devices))
    if memory_budget is None:
        memory_budget = _memory_budget()
    programs = {}

    def build(k):
        runner = RoundRunner(algorithm, data, cohort_size, Engine(k, mesh), seed, pool)
        compiled = runner.lower(state, runner.pack(indices, 0)).compile()
        mem = compiled.memory_analysis()
        programs[k] = (runner, compiled)
        return mem is None or mem.temp_size_in_bytes <= memory_budget

    def seconds(k):
        runner, compiled = programs[k]
        packed = jax.block_until_ready(runner.pack(indices, 0))
        t = time.perf_counter()
        jax.block_until_ready(compiled(state, *packed, np.int32(0)))
        return time.perf_counter() - t

    return autotune(sorted(candidates), build, seconds, repeats=repeats)


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
      chunk_size: the vectorization width K; None times a few on the first round.
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
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if cohort_size < 1:
        raise ValueError(f"cohort_size must be >= 1, got {cohort_size}")
    if cohort_size > train.num_clients:
        raise ValueError(
            f"cohort_size {cohort_size} is larger than the population of {train.num_clients} "
            "clients")
    if eval_every and eval_data is None:
        raise ValueError("eval_every is set but no eval_data was given")
    if params is None:
        params = algorithm.model.init(jax.random.key(seed))
    check_model(algorithm, train, params, algorithm.batching.resolve_batch_size(train))
    if resident is None:
        resident = is_in_memory(train) and train.nbytes <= resident_limit()
    state = algorithm.init(params)

    state = replicate(state, Engine(1, mesh))
    pool = resident_pool(train, mesh) if resident else None
    if chunk_size is None:
        chunk_size = choose_chunk_size(algorithm, train, cohort_size, state,
                                       sample_cohort(train.num_clients, cohort_size, seed, 0),
                                       seed=seed, mesh=mesh, pool=pool)
    runner = RoundRunner(algorithm, train, cohort_size, Engine(chunk_size, mesh), seed, pool)
    evaluator = (Evaluator(algorithm.model, eval_data, batch_size=eval_batch_size,
                           num_clients=eval_clients, engine=Engine(1, mesh), seed=seed)
                 if eval_data is not None else None)

    sink = None
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        sink = open(Path(output_dir) / "history.jsonl", "w")  # noqa: SIM115 - closed below

    history: list[dict] = []
    bar = tqdm(range(rounds), desc="rounds", unit="round", disable=not progress)
    start = time.perf_counter()
    # Round r+1's cohort is sampled, read and packed on a background thread while round r runs.
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedjax_sim-prefetch")

    def pack(r):
        return runner.pack(sample_cohort(train.num_clients, cohort_size, seed, r), r)

    try:
        upcoming = prefetch.submit(pack, 0) if rounds else None
        for r in bar:
            packed = upcoming.result()
            if r + 1 < rounds:
                upcoming = prefetch.submit(pack, r + 1)
            state, metrics = runner(state, packed, r)
            record = _round_record(r, metrics, train, time.perf_counter() - start, chunk_size)
            if record["num_excluded"]:
                msg = (f"round {r}: excluded {record['num_excluded']} client(s) with non-finite "
                       f"updates: {record['excluded_clients'][:5]}")
                warnings.warn(msg, stacklevel=2)
            if evaluator is not None and ((eval_every and (r + 1) % eval_every == 0)
                                          or r + 1 == rounds):
                ev = evaluator(state.params)
                record["eval"] = ev.summary
                record["eval_clients"] = {k: v.tolist() for k, v in ev.clients.items()}
            history.append(record)
            if sink is not None:
                sink.write(json.dumps({k: v for k, v in record.items()
                                       if k not in ("clients", "eval_clients")}) + "\n")
                sink.flush()
            postfix = {"loss": f"{record['train_loss']:.4f}"}
            if "eval" in record and "accuracy" in record["eval"]:
                postfix["acc"] = f"{record['eval']['accuracy']['weighted_mean']:.3f}"
            bar.set_postfix(postfix, refresh=False)
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
        if sink is not None:
            sink.close()
    return SimulationResult(params=_to_host(state.params), state=state, history=history,
                            chunk_size=chunk_size)


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
        "step_efficiency": step_efficiency(m.clients["num_steps"], chunk_size),
        "clients": clients,
    }
