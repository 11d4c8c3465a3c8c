"""Asynchronous FedBuff in virtual time (Nguyen et al. 2022): the event loop and its runner.

M clients train at once (the concurrency), each from the server version it was sent, for
`Devices.client_times` virtual seconds (download, local steps, upload); every K arrivals the
server aggregates (`fs.algorithms.fedbuff`) and its version goes up by one.

Who arrives when depends only on the device model and the seeded draws, never on a training
result, so the whole schedule is planned on the host first (`plan`: a heap of (finish time,
draw, position, client, start version)); the versions each aggregation reads then get slots
of a device-side stack of the fixed size the schedule needs (`Plan.num_slots`), so the run
is one compiled program. Each aggregation is ONE engine call over its K clients, each from
its own slot (lazy training: a client's result depends only on its start params and data).

The loop's rules:
- At time 0, draw 0 sends M clients the server's version 0.
- Clients finishing at the same instant are handled together, in (draw, position) order:
  each enters the buffer and a full buffer is aggregated at once (staleness tau = the
  server's version then - the client's start version); then the freed slots are refilled by
  the next draw from the version after those aggregations.
- Draw d is `default_rng([seed, d]).choice(not in flight, n, replace=False)`, and a client of
  draw d trains as synchronous round d would train it (its shuffle and key): a client
  appears at most once per draw, so (draw, client) identifies every local training.
So with K = M and every client taking the same time, draw r is `fs.sampling.uniform(N,
M).sample(seed, r)`, every staleness is 0 and the aggregations are FedAvg's rounds.

`fedavg_round_times` gives synchronous FedAvg's virtual clock on the same device model (a
round lasts as long as its slowest client).
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import sampling
from fedjax_sim import sinks as sinks_lib
from fedjax_sim.algorithms.fedbuff import BufferedAlgorithm, StartRows, staleness_weights
from fedjax_sim.checkpoints import Checkpoints
from fedjax_sim.checks import (
    check_data,
    check_integer,
    check_mesh,
    check_model_fits,
    check_not_empty,
    check_output_dir,
    check_some_client_trains,
)
from fedjax_sim.data.cohort import Batching, pack_cohort
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.devices import Devices
from fedjax_sim.engine import Engine, place_rows, replicate
from fedjax_sim.evaluation import Evaluator, fairness
from fedjax_sim.rounds import Packer, resident_pool
from fedjax_sim.simulation import _round_record  # the synchronous record's fields


@dataclasses.dataclass(frozen=True)
class Aggregation:
    """One planned aggregation: its K arrivals (host arrays, in arrival order).

    Attributes:
      time: virtual seconds at which the K-th arrival lands.
      version: the server version it aggregates into (the new one is `version + 1`).
      client_ids, draws, start_versions, finish_times: per arrival.
      slots: each start version's row of the version stack.
      new_slot: the row the new version is written to.
    """

    time: float
    version: int
    client_ids: np.ndarray
    draws: np.ndarray
    start_versions: np.ndarray
    finish_times: np.ndarray
    slots: np.ndarray | None = None
    new_slot: int = 0

    @property
    def staleness(self) -> np.ndarray:
        return self.version - self.start_versions


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run's schedule: its aggregations, the version stack's rows, the draws made."""

    aggregations: list[Aggregation]
    num_slots: int
    num_draws: int


def plan(num_clients: int, durations: Callable[[np.ndarray], np.ndarray], *,
         concurrency: int, buffer_size: int, num_aggregations: int, seed: int) -> Plan:
    """FedBuff's event loop in virtual time, without training (the module's rules).

    `durations(ids)` gives each client's virtual seconds (`Devices.client_times`).
    """
    in_flight = np.zeros(num_clients, bool)
    heap: list[tuple[float, int, int, int, int]] = []
    draws = 0

    def send(n: int, now: float, version: int) -> None:
        nonlocal draws
        ids = np.random.default_rng([seed, draws]).choice(np.flatnonzero(~in_flight), n,
                                                          replace=False)
        finish = now + np.asarray(durations(ids), np.float64)
        for pos, (c, f) in enumerate(zip(ids.tolist(), finish.tolist(), strict=True)):
            heapq.heappush(heap, (f, draws, pos, c, version))
        in_flight[ids] = True
        draws += 1

    send(concurrency, 0.0, 0)
    version, buffer, out = 0, [], []
    while len(out) < num_aggregations:
        now, arrived = heap[0][0], []
        while heap and heap[0][0] == now:
            arrived.append(heapq.heappop(heap))
        for event in arrived:
            in_flight[event[3]] = False
            buffer.append(event)
            if len(buffer) == buffer_size:
                f, d, _, c, v = (np.array(x) for x in zip(*buffer, strict=True))
                out.append(Aggregation(now, version, c.astype(np.int64), d.astype(np.int64),
                                       v.astype(np.int64), f.astype(np.float64)))
                version, buffer = version + 1, []
        send(len(arrived), now, version)
    return _allocate_slots(out[:num_aggregations], draws)


def _allocate_slots(aggregations: list[Aggregation], num_draws: int) -> Plan:
    """A stack row for every version while an aggregation still reads it: version v is
    written by aggregation v - 1 (v = 0 before the run) and read by those of the clients sent
    it. Aggregation j's new version may take a row that only j still reads: the program
    trains from the rows before it writes."""
    last_read: dict[int, int] = {}
    for j, a in enumerate(aggregations):
        for v in a.start_versions.tolist():
            last_read[v] = j
    live, free, size, done = {0: 0}, [], 1, []
    for j, a in enumerate(aggregations):
        slots = np.array([live[v] for v in a.start_versions.tolist()], np.int32)
        for v in [v for v in live if last_read.get(v, -1) <= j]:
            heapq.heappush(free, live.pop(v))
        new = heapq.heappop(free) if free else size
        size = max(size, new + 1)
        live[a.version + 1] = new
        done.append(dataclasses.replace(a, slots=slots, new_slot=new))
    return Plan(done, size, num_draws)


def model_bytes(params: Any) -> int:
    """Bytes of a params pytree: a client's download, and its upload (the delta)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                   for x in jax.tree.leaves(params)))


def client_steps(batching: Batching, data: FederatedData) -> np.ndarray:
    """i64[N], the local steps each client of `data` takes under `batching`."""
    b = batching.resolve_batch_size(data)
    return batching.steps_and_length(batching.examples_used(data.num_examples), b)[0]


def client_durations(devices: Devices, batching: Batching, data: FederatedData,
                     params: Any) -> Callable[[np.ndarray], np.ndarray]:
    """`ids -> seconds`: `devices.client_times` of their local steps, the model downloaded
    and its size uploaded."""
    if not isinstance(devices, Devices):
        raise TypeError(f"devices must be a fs.devices.Devices, got {type(devices).__name__}")
    if devices.num_clients != data.num_clients:
        raise ValueError(f"devices profiles {devices.num_clients} clients but the population "
                         f"has {data.num_clients}: give one profile per client")
    steps, b, size = client_steps(batching, data), batching.resolve_batch_size(data), \
        model_bytes(params)
    return lambda ids: devices.client_times(ids, steps[ids], b, size, size)


def fedavg_round_times(algorithm, train: FederatedData, devices: Devices, *,
                       cohort_size: int, rounds: int, seed: int = 0,
                       params: Any = None) -> np.ndarray:
    """f64[rounds], each synchronous FedAvg round's virtual seconds on `devices`: the slowest
    client of its cohort (`fs.sampling.uniform(N, cohort_size).sample(seed, r)`, as
    `fs.simulate` draws it), since the server waits for every upload. `algorithm`: anything
    with a `model` and a `batching` (FedAvg's, or FedBuff's for the same local work)."""
    sampler = sampling.uniform(train.num_clients, cohort_size)
    params = algorithm.model.init(jax.random.key(seed)) if params is None else params
    durations = client_durations(devices, algorithm.batching, train, params)
    return np.array([durations(sampler.sample(seed, r)).max() for r in range(rounds)])


def lognormal_devices(num_clients: int, *, seed: int = 0, example_time: float = 1e-3,
                      sigma: float = 1.0, download_rate: float = 1e7,
                      upload_rate: float = 2.5e6) -> Devices:
    """A seeded spread of device speeds: per-example compute log-normal with median
    `example_time` seconds and log-spread `sigma` (at sigma 1 the slowest of 1,000 clients is
    about 20x the median), links at fixed rates (bytes/s). The CLI's and the example's."""
    rng = np.random.default_rng([seed, 19])
    times = example_time * np.exp(sigma * rng.standard_normal(num_clients))
    return Devices(times, np.full(num_clients, float(download_rate)),
                   np.full(num_clients, float(upload_rate)))


@dataclasses.dataclass
class AsyncResult:
    """What an asynchronous run returns.

    Attributes:
      params: the final server params (numpy).
      state: the final `ServerState` (`round` = aggregations done = the server version).
      history: one dict per aggregation: "aggregation", "server_version" (after it),
        "virtual_time", "wall_time", "train_loss", "num_included", "num_excluded",
        "excluded_clients", "update_norm", "params_norm", "staleness_mean",
        "staleness_max", "server", "clients" (per-client metrics with "client_id",
        "staleness", "draw"), and where evaluated "eval" (with "eval_clients",
        "eval_fairness"), as `fs.simulate`'s records.
      plan: the schedule that ran.
      chunk_size: the vectorization width K_vmap.
      timings: "compile_s", "aggregations_s" (the programs, waited for), "eval_s",
        "total_s".
    """

    params: Any
    state: Any
    history: list[dict]
    plan: Plan
    chunk_size: int
    timings: dict


class AsyncSimulation:
    """A FedBuff run in virtual time, aggregation by aggregation (`step`, `run`).

    Args:
      algorithm: `fs.algorithms.fedbuff(...)`.
      train: the population.
      devices: `fs.devices.Devices`, one profile per client of `train`.
      concurrency: M, clients training at once (`buffer_size <= M <= N`).
      num_aggregations: the aggregations planned (they fix the stack of versions).
      seed: every random choice derives from it (draws, shuffles, keys).
      params: initial params (default `model.init(key(seed))`).
      eval_data: the global model is evaluated on it every `eval_every` aggregations and
        after a run's last, as `fs.Simulation` does.
      eval_every: aggregations between evaluations (0: only after the last).
      eval_clients: evaluate a sample of this many clients (None: all of them).
      eval_batch_size: the evaluation's batch size.
      chunk_size: K_vmap, clients vectorized side by side (results agree whatever it is, to
        float summation order).
      mesh: `fs.client_mesh()` to split each aggregation's clients over devices.
      output_dir: the run directory the records go to as the run goes, as `fs.Simulation`
        writes them, each record's step its "aggregation"; `restore` rewrites them to the
        restored history.
      sinks: the sinks (`fs.sinks`; default history.jsonl and clients.jsonl).
    """

    def __init__(self, algorithm: BufferedAlgorithm, train: FederatedData, devices: Devices,
                 *, concurrency: int, num_aggregations: int, seed: int = 0,
                 params: Any = None, eval_data: FederatedData | None = None,
                 eval_every: int = 0, eval_clients: int | None = None,
                 eval_batch_size: int = 64, chunk_size: int = 1,
                 mesh: jax.sharding.Mesh | None = None,
                 output_dir: str | os.PathLike | None = None,
                 sinks: str | Sequence[str | sinks_lib.Sink] | None = None):
        if not isinstance(algorithm, BufferedAlgorithm):
            raise TypeError(f"algorithm must be fs.algorithms.fedbuff(...), got "
                            f"{type(algorithm).__name__}")
        train = check_not_empty(check_data("train", train), "train")
        concurrency = check_integer("concurrency", concurrency, 1)
        k = algorithm.buffer_size
        if concurrency > train.num_clients:
            raise ValueError(f"concurrency {concurrency} is larger than the population of "
                             f"{train.num_clients} clients")
        if k > concurrency:
            raise ValueError(f"buffer_size {k} is larger than the concurrency {concurrency}: "
                             "the buffer would never fill (at most M clients are in flight)")
        num_aggregations = check_integer("num_aggregations", num_aggregations, 1)
        seed = check_integer("seed", seed, 0, 2**32 - 1)
        self.eval_every = check_integer("eval_every", eval_every, 0)
        check_mesh(mesh)
        engine = Engine(check_integer("chunk_size", chunk_size, 1), mesh)
        per_device = -(-k // engine.num_devices)
        if chunk_size > per_device:
            raise ValueError(f"chunk_size {chunk_size} is larger than the {per_device} "
                             f"client(s) per device (buffer {k} over {engine.num_devices} "
                             f"device(s)); use chunk_size <= {per_device}")
        if eval_data is None and (eval_every or eval_clients is not None):
            raise ValueError("eval_every or eval_clients is set but no eval_data was given")
        if output_dir is not None:
            output_dir = check_output_dir(output_dir)
        sinks = sinks_lib.resolve(sinks, output_dir)
        if params is None:
            params = algorithm.model.init(jax.random.key(seed))
        # The resident pool holds the whole population, so every value is checked up front.
        check_model_fits(algorithm.model, train, params,
                         algorithm.batching.resolve_batch_size(train))
        check_some_client_trains(algorithm.batching, train)
        durations = client_durations(devices, algorithm.batching, train, params)
        self.plan = plan(train.num_clients, durations, concurrency=concurrency,
                         buffer_size=k, num_aggregations=num_aggregations, seed=seed)
        self.algorithm, self.train, self.seed, self.engine = algorithm, train, seed, engine
        self.concurrency = concurrency
        self.steps = client_steps(algorithm.batching, train)
        self.state = replicate(algorithm.init(params, jax.random.key(seed)), engine)
        self.versions = replicate(jax.tree.map(
            lambda p: jnp.zeros((self.plan.num_slots, *p.shape), p.dtype).at[0].set(p),
            self.state.params), engine)
        self.packer = Packer(train, algorithm.passes, k, engine, resident_pool(train, mesh),
                             algorithm.model.label)
        self.evaluator = None
        if eval_data is not None:
            eval_data = check_not_empty(check_data("eval_data", eval_data), "eval_data")
            self.evaluator = Evaluator(algorithm.model, eval_data, batch_size=eval_batch_size,
                                       num_clients=eval_clients, engine=Engine(1, mesh),
                                       seed=seed, name="eval_data")
            self.evaluator.check(params)

        def program(state, versions, rows, new_slot, inputs, *, engine):
            state, metrics = algorithm.aggregate(state, versions, rows, inputs, engine=engine)
            versions = jax.tree.map(lambda v, p: v.at[new_slot].set(p), versions,
                                    state.params)
            return state, versions, metrics

        self._fn = jax.jit(program, static_argnames=("engine",), donate_argnums=(1,))
        self._compiled = None
        self._start = time.perf_counter()
        self.aggregation, self.history = 0, []
        self.timings = {"compile_s": 0.0, "aggregations_s": 0.0, "eval_s": 0.0}
        self.recorder = None if not sinks else sinks_lib.Recorder(sinks, output_dir)
        if self.recorder is not None:
            self.recorder.open(self.history)

    def _order(self, a: Aggregation) -> np.ndarray:
        """Cohort order: most steps first, then by id (a synchronous cohort's sort, so K = M
        packs FedAvg's cohort), then by draw (a client may arrive twice)."""
        return np.lexsort((a.draws, a.client_ids, -self.steps[a.client_ids]))

    def pack(self, j: int):
        """Aggregation j's device inputs: `(rows, new slot, RoundInputs)`."""
        a = self.plan.aggregations[j]
        order = self._order(a)
        cohort, rows = pack_cohort(self.train, a.client_ids[order], self.algorithm.batching,
                                   self.packer.shapes[-1], seed=self.seed,
                                   round_num=a.draws[order], sort=False)
        pad = len(cohort.client_ids) - len(order)
        fill = lambda x, dtype: np.concatenate([x[order], np.zeros(pad, x.dtype)]).astype(dtype)
        start = StartRows(fill(a.slots, np.int32), fill(a.start_versions, np.int32),
                          fill(a.draws, np.int32),
                          fill(staleness_weights(self.algorithm.staleness, a.staleness),
                               np.float32))
        return (place_rows(start, self.engine), jnp.int32(a.new_slot),
                self.packer.place([cohort], [rows]))

    def step(self, packed=None) -> dict:
        """Runs the next aggregation (on `packed`, its `pack`, default packed now); returns
        its record."""
        j = self.aggregation
        if j >= len(self.plan.aggregations):
            raise RuntimeError(f"the plan holds {len(self.plan.aggregations)} aggregations; "
                               "build the AsyncSimulation with a larger num_aggregations")
        args = self.pack(j) if packed is None else packed
        if self._compiled is None:
            t = time.perf_counter()
            self._compiled = self._fn.lower(self.state, self.versions, *args,
                                            engine=self.engine).compile()
            self.timings["compile_s"] += time.perf_counter() - t
        t = time.perf_counter()
        self.state, self.versions, metrics = self._compiled(self.state, self.versions, *args)
        jax.block_until_ready(self.state.params)
        self.timings["aggregations_s"] += time.perf_counter() - t
        record = _round_record(j, metrics, self.train, time.perf_counter() - self._start,
                               self.engine.chunk_size)
        del record["round"]
        a, order = self.plan.aggregations[j], self._order(self.plan.aggregations[j])
        record["clients"]["staleness"] = a.staleness[order].tolist()
        record["clients"]["draw"] = a.draws[order].tolist()
        record = {"aggregation": j, "server_version": j + 1, "virtual_time": a.time,
                  "staleness_mean": float(a.staleness.mean()),
                  "staleness_max": int(a.staleness.max()), **record}
        self.aggregation = j + 1
        last = self.aggregation == len(self.plan.aggregations)
        if self.evaluator is not None and (last or (
                self.eval_every and self.aggregation % self.eval_every == 0)):
            t = time.perf_counter()
            ev = self.evaluator(self.state.params, personalized=False,
                                round_num=self.aggregation)
            record["eval"] = ev.summary
            record["eval_clients"] = {k: v.tolist() for k, v in ev.clients.items()}
            if "accuracy" in ev.clients:
                record["eval_fairness"] = fairness(ev.clients["accuracy"],
                                                   ev.clients["num_examples"])
            self.timings["eval_s"] += time.perf_counter() - t
        self.history.append(record)
        if self.recorder is not None:
            self.recorder.write(record, self.history)
        return record

    def run(self, num_aggregations: int | None = None) -> AsyncResult:
        """Runs `num_aggregations` more (default: the rest of the plan); the next
        aggregation is packed on a background thread while one runs, as `fs.Simulation`
        packs its next round."""
        left = len(self.plan.aggregations) - self.aggregation
        n = left if num_aggregations is None else check_integer(
            "num_aggregations", num_aggregations, 0, left)
        end = self.aggregation + n
        try:
            with ThreadPoolExecutor(max_workers=1,
                                    thread_name_prefix="fedjax_sim-async") as pool:
                upcoming = pool.submit(self.pack, self.aggregation) if n else None
                while self.aggregation < end:
                    packed = upcoming.result()
                    if self.aggregation + 1 < end:
                        upcoming = pool.submit(self.pack, self.aggregation + 1)
                    self.step(packed)
        finally:
            if self.recorder is not None:
                self.recorder.close()
        return self.result()

    def _fingerprint(self) -> dict:
        """What a checkpoint's run must share with this one: the plan follows from these."""
        return {"num_clients": self.train.num_clients, "concurrency": self.concurrency,
                "buffer_size": self.algorithm.buffer_size,
                "staleness": self.algorithm.staleness, "seed": self.seed,
                "num_aggregations": len(self.plan.aggregations),
                "num_slots": self.plan.num_slots, "chunk_size": self.engine.chunk_size}

    def save(self, directory) -> None:
        """A checkpoint in `directory` (orbax, `fs.checkpoints.Checkpoints`) of the
        aggregations done: the server state, the version stack and the history; the plan
        and the position in it follow from the configuration and the count."""
        meta = {"aggregation": self.aggregation, "history": self.history,
                "fingerprint": self._fingerprint()}
        Checkpoints(directory).save(self.aggregation, self.state, self.versions, meta)

    def restore(self, directory) -> bool:
        """Continues from the newest checkpoint in `directory` (False: there is none); one
        from another configuration is refused, naming the difference. The run goes on with
        the same bits as one never stopped."""
        found = Checkpoints(directory).restore(self.state, self.versions)
        if found is None:
            return False
        state, versions, meta = found
        mine = self._fingerprint()
        diff = [f"{k}: checkpoint {meta['fingerprint'].get(k)!r}, now {v!r}"
                for k, v in mine.items() if meta["fingerprint"].get(k) != v]
        if diff:
            raise ValueError(f"the checkpoint in {directory} is from another configuration "
                             f"({'; '.join(diff)})")
        self.state, self.versions = state, versions
        self.aggregation, self.history = int(meta["aggregation"]), list(meta["history"])
        if self.recorder is not None:
            self.recorder.close()
            self.recorder.open(self.history)
        return True

    def result(self) -> AsyncResult:
        self.timings["total_s"] = time.perf_counter() - self._start
        return AsyncResult(params=jax.tree.map(np.asarray, self.state.params),
                           state=self.state, history=self.history, plan=self.plan,
                           chunk_size=self.engine.chunk_size, timings=dict(self.timings))


def simulate_async(algorithm: BufferedAlgorithm, train: FederatedData, devices: Devices, *,
                   concurrency: int, num_aggregations: int, **kwargs) -> AsyncResult:
    """`AsyncSimulation(...).run()`: `num_aggregations` FedBuff aggregations in virtual time.

    Example:
      >>> import optax, fedjax_sim as fs
      >>> train, test = fs.data.synthetic(1.0, 1.0, num_clients=40, seed=0)
      >>> algo = fs.algorithms.fedbuff(fs.models.logistic_regression(60, 10),
      ...                              optax.sgd(0.05), buffer_size=5)
      >>> devices = fs.asynchronous.lognormal_devices(40, seed=0)
      >>> res = fs.asynchronous.simulate_async(algo, train, devices, concurrency=10,
      ...                                      num_aggregations=3)
      >>> res.history[-1]["server_version"]
      3
    """
    return AsyncSimulation(algorithm, train, devices, concurrency=concurrency,
                           num_aggregations=num_aggregations, **kwargs).run()
