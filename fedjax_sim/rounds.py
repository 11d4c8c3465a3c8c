"""From a sampled cohort to a finished round: `Packer` turns the cohort's population positions
into the round's device inputs (one `Cohort` per pass and the pool of examples), and
`RoundRunner` runs the compiled round on them, gathering and scattering the client store.
`ScanRunner` runs many rounds in one program, each sampling and packing its cohort on the
device.

Simulation, evaluation, the tests and the benchmarks all go through `Packer`, so the
pack-then-place sequence is written once.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils

from fedjax_sim import client_store
from fedjax_sim.algorithms.base import FederatedAlgorithm, RoundInputs
from fedjax_sim.data.cohort import (
    Batching,
    Cohort,
    CohortShape,
    host_pool,
    pack_cohort,
    resident_order,
)
from fedjax_sim.data.device_cohort import DevicePacking
from fedjax_sim.data.federated import FederatedData, check_rows
from fedjax_sim.engine import Engine, place_cohort, place_rows, replicate


class Packer:
    """Packs cohorts of `cohort_size` clients of `data` for one pass per `Batching`.

    `pool` is the population on the device(s) (`resident_pool`), or None to gather each
    round's rows on the host (then checked as they are read: a streamed population may be too
    large to check up front). Every pass holds the same clients in the same order: the last
    pass's (the local training's), sorted by its step counts.
    """

    def __init__(self, data: FederatedData, passes: Sequence[Batching], cohort_size: int,
                 engine: Engine, pool: dict[str, jax.Array] | None = None,
                 label: tuple[str, int] | None = None):
        self.data, self.passes, self.engine, self.pool, self.label = (data, tuple(passes),
                                                                      engine, pool, label)
        self.shapes = tuple(CohortShape.for_population(data, b, cohort_size,
                                                       engine.cohort_multiple)
                            for b in self.passes)

    def pack(self, indices: np.ndarray, *, seed: int, round_num: int,
             max_steps: np.ndarray | None = None) -> tuple[list[Cohort], list[np.ndarray]]:
        """Host cohorts, one per pass, and each pass's population rows in cohort order;
        `max_steps` caps each client's local training steps (`pack_cohort`)."""
        main, rows = pack_cohort(self.data, indices, self.passes[-1], self.shapes[-1],
                                 seed=seed, round_num=round_num, max_steps=max_steps)
        ordered = np.asarray(main.client_ids[: len(indices)], np.int64)
        cohorts, all_rows = [], []
        for batching, shape in zip(self.passes[:-1], self.shapes[:-1], strict=True):
            c, r = pack_cohort(self.data, ordered, batching, shape, seed=seed,
                               round_num=round_num, sort=False)
            cohorts.append(c)
            all_rows.append(r)
        return [*cohorts, main], [*all_rows, rows]

    def place(self, cohorts: list[Cohort], rows: list[np.ndarray]) -> RoundInputs:
        """The round's device inputs from `pack`'s host cohorts."""
        if self.pool is not None:
            placed = [place_cohort(resident_order(c, r), self.engine)
                      for c, r in zip(cohorts, rows, strict=True)]
            return RoundInputs(tuple(placed), self.pool, self.data.num_clients)
        # A host pool holds each pass's rows one after another; each order is offset to its own.
        parts, placed, offset = [], [], 0
        for c, r, shape in zip(cohorts, rows, self.shapes, strict=True):
            part = host_pool(self.data, r, shape)
            check_rows(self.data, r, part, self.label)
            parts.append(part)
            placed.append(place_cohort(_offset(c, offset), self.engine))
            offset += shape.pool_capacity
        pool = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return RoundInputs(tuple(placed), replicate(pool, self.engine), self.data.num_clients)

    def __call__(self, indices: np.ndarray, *, seed: int, round_num: int,
                 max_steps: np.ndarray | None = None) -> RoundInputs:
        return self.place(*self.pack(indices, seed=seed, round_num=round_num,
                                     max_steps=max_steps))


def _offset(cohort: Cohort, offset: int) -> Cohort:
    return dataclasses.replace(cohort, order=(cohort.order + offset).astype(np.int32))


class RoundRunner:
    """Packs cohorts and runs the jitted round for one engine (one compiled program).

    The round program is `(state, store, inputs) -> (state, store, metrics)`: it gathers the
    cohort's rows of the client store (None for a stateless algorithm), runs
    `algorithm.round` and scatters the new rows back. With `donate`, the store's buffers are
    reused for the new store (a table of every client's state is not copied each round). A
    `HostStore` stays on the host: the program takes the cohort's rows (`CohortRows`) and
    returns the new ones, which `__call__` writes back.
    """

    def __init__(self, algorithm: FederatedAlgorithm, data: FederatedData, cohort_size: int,
                 engine: Engine, seed: int, pool: dict[str, jax.Array] | None, *,
                 donate: bool = False):
        self.algorithm, self.data, self.engine, self.seed = algorithm, data, engine, seed
        self.packer = Packer(data, algorithm.passes, cohort_size, engine, pool,
                             algorithm.model.label)
        self.shape = self.packer.shapes[-1]
        self.compiled = None
        num_clients = data.num_clients

        def round_fn(state, store, inputs, *, engine):
            ids = inputs.cohort.client_ids
            initial = None if store is None else algorithm.client_state(state.params)
            if isinstance(store, client_store.ClientStore) and engine.mesh is None:
                # One device: the engine reads and writes the table chunk by chunk.
                whole = client_store.InScan(store, initial, num_clients)
                state, out, metrics = algorithm.round(state, inputs, whole, engine=engine)
                return state, out.store if isinstance(out, client_store.InScan) else out, metrics
            if isinstance(store, client_store.CohortRows):
                rows = client_store.fill(store, initial)
            else:
                rows = () if store is None else client_store.gather(store, ids, initial)
            state, rows, metrics = algorithm.round(state, inputs, rows, engine=engine)
            # A client excluded as not finite writes nothing: its row stays as it was.
            writes = metrics.clients.get("finite")
            if isinstance(store, client_store.ClientStore):
                store = client_store.scatter(store, ids, rows, num_clients, writes)
            elif store is not None:
                known = jnp.ones(ids.shape, bool) if writes is None else writes
                store = client_store.CohortRows(rows, known)
            return state, store, metrics

        self.round_fn, self.donate = round_fn, donate
        self.fn = jax.jit(round_fn, static_argnames=("engine",),
                          donate_argnums=(1,) if donate else ())

    def pack(self, indices: np.ndarray, round_num: int,
             max_steps: np.ndarray | None = None) -> RoundInputs:
        return self.packer(indices, seed=self.seed, round_num=round_num, max_steps=max_steps)

    def _program_store(self, store, inputs: RoundInputs):
        """What the program takes for `store`: a host store's cohort rows, placed."""
        if isinstance(store, client_store.HostStore):
            return place_rows(store.rows(_host(inputs.cohort.client_ids)), self.engine)
        return store

    def lower(self, state, store, inputs: RoundInputs) -> jax.stages.Lowered:
        """The round program for these shapes."""
        return self.fn.lower(state, self._program_store(store, inputs), inputs,
                             engine=self.engine)

    def compile(self, state, store, inputs: RoundInputs) -> float:
        """Compiles the round program ahead of time, for `__call__`; returns the seconds."""
        start = time.perf_counter()
        self.compiled = self.lower(state, store, inputs).compile()
        return time.perf_counter() - start

    def __call__(self, state, store, inputs: RoundInputs, *,
                 commit: bool = True) -> tuple[Any, Any, Any]:
        """One round; a host store's new rows are written back unless `commit` is False
        (the chunk-size search times rounds it does not keep)."""
        program_store = self._program_store(store, inputs)
        if self.compiled is not None:
            state, new, metrics = self.compiled(state, program_store, inputs)
        else:
            state, new, metrics = self.fn(state, program_store, inputs, engine=self.engine)
        if isinstance(store, client_store.HostStore):
            if commit:
                ids = _host(inputs.cohort.client_ids)
                store.write(np.where(_host(new.known), ids, store.num_rows),
                            jax.tree.map(_host, new.rows))
            new = store
        return state, new, metrics


class ScanRunner:
    """Up to `length` rounds in one compiled program, for a population resident on the
    device: a `lax.scan` over rounds, each drawing its cohort with the sampler's `device` draw
    for the state's round number, packing it on the device (`DevicePacking`: the host
    packer's cohorts, bit for bit) and running `runner`'s round program on it. The program
    takes how many rounds to run (at most `length`; the scan passes the state through the
    rest), so a shorter call (up to an evaluation, a checkpoint or the run's end) compiles
    nothing new; it returns every round's metrics stacked `[length, ...]`.

    Example:
      >>> scan = ScanRunner(runner, fs.sampling.on_device(1000, 100), 50)  # doctest: +SKIP
      >>> state, store, metrics = scan(state, store, 20)  # rounds 0-19    # doctest: +SKIP
    """

    def __init__(self, runner: RoundRunner, sampler: Any, length: int):
        packer = runner.packer
        if packer.pool is None:
            raise ValueError("rounds in one program need the population resident on the "
                             "device (resident=True)")
        if sampler.device is None:
            raise ValueError(f"the sampler {sampler.name} draws on the host; rounds in one "
                             "program need one that draws on the device "
                             "(fs.sampling.on_device)")
        self.runner, self.length, self.compiled = runner, length, None
        data, draw, round_fn = packer.data, sampler.device, runner.round_fn
        packings = tuple(DevicePacking.for_population(data, b, shape, sampler.max_size)
                         for b, shape in zip(packer.passes, packer.shapes, strict=True))
        self.tables = replicate(tuple(p.tables(data) for p in packings),
                                Engine(1, runner.engine.mesh))

        # The seed is an input, as the state's key is: one program serves every seed.
        def program(state, store, pool, tables, seed, count, *, engine):
            def one_round(carry):
                state, store = carry
                r = state.round
                ids = draw(seed, r)
                main = packings[-1].pack(tables[-1], ids, seed=seed, round_num=r)
                ordered = main.client_ids[: ids.shape[0]]
                others = [p.pack(t, ordered, seed=seed, round_num=r, sort=False)
                          for p, t in zip(packings[:-1], tables[:-1], strict=True)]
                inputs = RoundInputs((*others, main), pool, data.num_clients)
                state, store, metrics = round_fn(state, store, inputs, engine=engine)
                return (state, store), metrics

            shapes = jax.eval_shape(one_round, (state, store))[1]
            nothing = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

            def body(carry, i):
                return lax.cond(i < count, one_round, lambda c: (c, nothing), carry)

            (state, store), metrics = lax.scan(body, (state, store),
                                               jnp.arange(length, dtype=jnp.int32))
            return state, store, metrics

        self.fn = jax.jit(program, static_argnames=("engine",),
                          donate_argnums=(1,) if runner.donate else ())

    def _args(self, store, count: int) -> tuple:
        if isinstance(store, client_store.HostStore):
            raise ValueError("rounds in one program need the client store on the device "
                             "(client_store='device'), not a HostStore")
        if not 0 <= count <= self.length:
            raise ValueError(f"a call runs 0 to {self.length} rounds, got {count}")
        return (store, self.runner.packer.pool, self.tables, np.uint32(self.runner.seed),
                np.int32(count))

    def compile(self, state, store) -> float:
        """Compiles the program ahead of time, for `__call__`; returns the seconds."""
        start = time.perf_counter()
        self.compiled = self.fn.lower(state, *self._args(store, 0),
                                      engine=self.runner.engine).compile()
        return time.perf_counter() - start

    def __call__(self, state, store, count: int) -> tuple[Any, Any, Any]:
        """Runs rounds `state.round` to `state.round + count - 1`; returns the state, the
        store and the metrics stacked over the program's `length` rounds (the first `count`
        are the rounds run)."""
        args = self._args(store, count)
        if self.compiled is not None:
            return self.compiled(state, *args)
        return self.fn(state, *args, engine=self.runner.engine)


def _host(x: jax.Array) -> np.ndarray:
    """A global array's values on this host (gathered from every process)."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def new_store(algorithm: FederatedAlgorithm, data: FederatedData, params: Any,
              engine: Engine, where: str | os.PathLike | None = None) -> Any:
    """An empty client store for a stateful algorithm (None for a stateless one).

    `where`: "device" (a `ClientStore`), "host" (a `HostStore` in memory), a directory (a
    `HostStore` memory-mapped there), or None: on the device when the table takes at most
    `resident_limit()` bytes, else in host memory.
    """
    if algorithm.client_state is None:
        return None
    template = jax.eval_shape(algorithm.client_state, params)
    if where is None:
        row = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                  for x in jax.tree.leaves(template))
        where = "device" if row * data.num_clients <= resident_limit() else "host"
    if where == "device":
        return client_store.create(data.num_clients, template, engine)
    return client_store.HostStore.create(data.num_clients, template,
                                         None if where == "host" else where)


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


def resident_pool(data: FederatedData, mesh: jax.sharding.Mesh | None) -> dict[str, jax.Array]:
    """The population's features on every device (then cohorts are gathered there): placed
    once per run and shared by every chunk size's program."""
    return replicate(data.features, Engine(1, mesh))
