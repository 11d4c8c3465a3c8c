"""Sweeps as one program: many simulations `jax.vmap`ped over a run axis.

A sweep is seeds times a grid of hyperparameters that the server state makes traceable
(`ServerState.hparams`, the server optimizer's injected values in `opt_state`, the aggregation
chain's bounds in `agg_state`): every run has the same shapes, so one compiled round serves
all of them, vmapped over the runs' stacked states, cohorts and client stores, and split over
devices along the run axis (`shard_map`: the runs never talk to each other). The runs share
the one resident population; each samples, shuffles and keys its own cohorts from its seed,
so run i is the run `fs.Simulation(algorithm with run i's values, seed=run i's seed)` makes
alone (to float summation order; tested).

A sweep too large for the memory budget is split into groups of runs, each group the same
compiled program (a last, smaller group is padded with copies of its last run): the group
size comes from the compiled program's memory analysis.

Example:
  >>> client = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)    # doctest: +SKIP
  >>> algo = fs.algorithms.fedavg(model, client, batch_size=16)          # doctest: +SKIP
  >>> result = fs.simulate_sweep(algo, train, rounds=100, cohort_size=100, seeds=8,
  ...                            grid={"client_lr": [0.03, 0.1]})       # doctest: +SKIP
  >>> result.histories[0][-1]["train_loss"], result.runs[0].name          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from fedjax_sim import chunk_size as chunk_size_lib
from fedjax_sim import client_store, privacy, sampling
from fedjax_sim import sinks as sinks_lib
from fedjax_sim.algorithms.base import (
    FederatedAlgorithm,
    RoundInputs,
    ServerState,
    tree_norm,
    with_hparams,
)
from fedjax_sim.checks import (
    check_algorithm_fits,
    check_data,
    check_evaluation,
    check_integer,
    check_not_empty,
    check_number,
    check_output_dir,
)
from fedjax_sim.data.cohort import resident_order
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.data.storage import is_in_memory
from fedjax_sim.engine import Engine
from fedjax_sim.evaluation import Evaluator
from fedjax_sim.health import Monitor
from fedjax_sim.rounds import RoundRunner, device_memory, new_store, resident_pool
from fedjax_sim.simulation import _link_bits, _round_record, evaluation_record

RUNS = "runs"  # the mesh axis the runs are split over

# The traceable fields by their short names: where each lives and how to make it traceable.
ALIASES = {"client_lr": "client.learning_rate", "server_lr": "server.learning_rate"}
_HOW = {
    "client_lr": "build the client optimizer with optax.inject_hyperparams, e.g. "
                 "optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)",
    "server_lr": "build the server optimizer with optax.inject_hyperparams, e.g. "
                 "optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)",
    "mu": "use fs.algorithms.fedprox with mu > 0 (a zero mu compiles no proximal term)",
    "clip_norm": "put fs.aggregators.clip (or dp_mean, robust.norm_bound) in the chain",
    "noise_multiplier": "put fs.aggregators.dp_mean in the chain",
}
_AGGREGATOR_FIELDS = ("clip_norm", "noise_multiplier")
# Positive where the stage's own check requires it (`clip`, `dp_mean`).
_BOUNDS = {"clip_norm": {"above": 0}, "noise_multiplier": {"at_least": 0}, "mu": {"at_least": 0}}


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: its seed and its grid values, and the name of its directory."""

    name: str
    seed: int
    values: dict


@dataclasses.dataclass
class SweepResult:
    """What a sweep returns.

    Attributes:
      runs: the runs, in grid order (each grid point's seeds together).
      histories: one history per run, records with `fs.Simulation`'s keys.
      params: each run's final server params (numpy).
      stores: each run's client store (None for a stateless algorithm).
      chunk_size: the vectorization width K of every run.
      groups: the runs' indices in each vmapped group, in the order they ran.
      timings: seconds in "compile_s" (the group program and its memory analysis),
        "rounds_s", "eval_s" and "total_s".
      privacy: each run's guarantee spent (`fs.SimulationResult.privacy`), or None.
    """

    runs: list[Run]
    histories: list[list[dict]]
    params: list[Any]
    stores: list[Any] | None
    chunk_size: int
    groups: list[list[int]]
    timings: dict
    privacy: list[dict] | None = None


def traceable(state: ServerState) -> list[str]:
    """The grid fields a sweep can vary for this state (besides the seed): "client_lr" and
    "client.<name>" for each injected client hyperparameter, "server_lr" and "server.<name>"
    for the server optimizer's, the algorithm's own ("mu"), and the chain's "clip_norm" and
    "noise_multiplier" where a stage holds them."""
    names = [f"client.{k}" for k in state.hparams.get("client", {})]
    names += [f"server.{k}" for k in _server_hparams(state.opt_state)]
    names += [k for k in state.hparams if k != "client"]
    names += [k for k in _AGGREGATOR_FIELDS
              if optax.tree_utils.tree_get_all_with_path(state.agg_state, k)]
    names += [alias for alias, full in ALIASES.items() if full in names]
    return sorted(names)


def set_values(state: ServerState, values: Mapping[str, float]) -> ServerState:
    """`state` with a run's grid values (names as `traceable` gives them), each in the dtype
    of the value it replaces."""
    for name, value in values.items():
        where, _, key = ALIASES.get(name, name).rpartition(".")
        if where == "client":
            state = with_hparams(state, client={key: value})
        elif where == "server":
            state = state._replace(opt_state=_typed_set(state.opt_state, key, value))
        elif key in _AGGREGATOR_FIELDS:
            state = state._replace(agg_state=_typed_set(state.agg_state, key, value))
        else:
            state = with_hparams(state, **{key: value})
    return state


def _server_hparams(opt_state) -> list[str]:
    found = []
    is_injected = lambda x: isinstance(getattr(x, "hyperparams", None), dict)
    for node in jax.tree.leaves(opt_state, is_leaf=is_injected):
        if is_injected(node):
            found += [k for k, v in node.hyperparams.items() if not callable(v)]
    return found


def _typed_set(tree, key: str, value: float):
    dtype = jnp.result_type(optax.tree_utils.tree_get_all_with_path(tree, key)[0][1])
    return optax.tree_utils.tree_set(tree, **{key: jnp.asarray(value, dtype)})


def check_grid(grid: Mapping[str, Sequence[float]] | None, state: ServerState) -> dict:
    """`grid` as `{field: [values]}`, refusing (before anything compiles) a field the state
    cannot trace, naming the ones it can, and values that are not finite numbers."""
    if grid is None:
        return {}
    if not isinstance(grid, Mapping):
        raise TypeError(f"grid must be a dict {{field: [values]}}, got {type(grid).__name__}")
    known = traceable(state)
    out = {}
    for name, values in grid.items():
        if name == "seed":
            raise ValueError("grid: give the seeds as seeds= (a count or a list), not in the grid")
        if name not in known:
            how = f" ({_HOW[name]})" if name in _HOW else (
                " (it sets the compiled program's shapes or structure, e.g. a batch size, "
                "cohort size, epoch count or model width: run one sweep per value)")
            raise ValueError(f"grid over {name!r}: this algorithm cannot trace it{how}. "
                             f"Traceable here: {known} and the seed (seeds=)")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"grid[{name!r}] must be a non-empty list of numbers, got "
                             f"{values!r}"[:200])
        values = [check_number(f"grid[{name!r}]", v, **_BOUNDS.get(name, {})) for v in values]
        if len(set(values)) != len(values):
            raise ValueError(f"grid[{name!r}] repeats a value: {values}")
        out[name] = values
    return out


def runs_of(grid: Mapping[str, Sequence[float]], seeds: Sequence[int]) -> list[Run]:
    """The product of the grid's values and the seeds, each grid point's seeds together,
    named for its values ("client_lr=0.03,seed=2")."""
    runs = []
    for point in itertools.product(*grid.values()):
        values = dict(zip(grid, point, strict=True))
        for seed in seeds:
            name = ",".join([*(f"{k}={v:g}" for k, v in values.items()), f"seed={seed}"])
            runs.append(Run(name, seed, values))
    if len({r.name for r in runs}) != len(runs):
        raise ValueError("two grid values print alike (to 6 significant digits); their runs "
                         "would share a name")
    return runs


class Sweep:
    """Runs of `algorithm` on `train` over `seeds` x `grid`, vmapped in one program.

    Args:
      algorithm: e.g. `fs.algorithms.fedavg(...)`, built with the values the grid leaves
        alone (and the grid's fields traceable: `traceable`).
      train: the training population; it must fit in memory (it stays on the device(s)).
      cohort_size: clients per round, each run drawing its own (uniformly without
        replacement); or give `sampler` (any `fs.sampling` sampler; cohorts pad to its
        largest, so every run has the same shapes).
      seeds: a count (seeds 0..n-1) or a list of seeds.
      grid: `{field: [values]}`, every combination run with every seed. Fields:
        "client_lr", "server_lr", "mu", "clip_norm", "noise_multiplier", or any injected
        hyperparameter as "client.<name>" / "server.<name>" (`traceable`).
      params: the initial params of every run; default each run's
        `algorithm.model.init(key(seed))`, as `fs.Simulation` does.
      eval_data: the population each run is evaluated on (as `Simulation`'s).
      eval_every: evaluate each run every this many rounds, and after the last.
      eval_clients: evaluate this many clients of `eval_data` (as `Simulation`'s).
      eval_batch_size: examples per evaluation batch.
      eval_rolling: a fresh sample of `eval_clients` at each evaluation.
      chunk_size: K; default the K `fs.Simulation` would choose for one run (its cache, or a
        timed search).
      devices: how many devices to split the run axis over (default every local device, at
        most one per run of a group).
      memory_budget: bytes a device may hold for one group (default three quarters of an
        accelerator's memory, 4 GiB on a CPU); a larger sweep runs in groups.
      output_dir: where `sweep.json` and one run directory per run go (the sinks' records,
        `summary.json`, `params.msgpack`).
      sinks: the sink names each run directory gets, as `Simulation`'s (default jsonl:
        `history.jsonl` and `clients.jsonl`).
      delta: for a chain with a DP stage, each run's records hold its "epsilon" at this
        delta (`fs.Simulation`'s); a swept noise multiplier is accounted per run.
      accountant: "rdp" (default) or "pld", as `Simulation`'s.
      progress: a tqdm progress bar over the rounds.
    """

    def __init__(self, algorithm: FederatedAlgorithm, train: FederatedData, *,
                 cohort_size: int | None = None, sampler: sampling.Sampler | None = None,
                 seeds: int | Sequence[int] = 1,
                 grid: Mapping[str, Sequence[float]] | None = None, params: Any = None,
                 eval_data: FederatedData | None = None, eval_every: int = 0,
                 eval_clients: int | None = None, eval_batch_size: int = 64,
                 eval_rolling: bool = False, chunk_size: int | None = None,
                 devices: int | None = None, memory_budget: int | None = None,
                 output_dir: str | os.PathLike | None = None,
                 sinks: str | Sequence[str] | None = None, delta: float | None = None,
                 accountant: privacy.Accountant | None = None, progress: bool = True):
        if not isinstance(algorithm, FederatedAlgorithm):
            raise TypeError(f"algorithm must be a FederatedAlgorithm (e.g. fs.algorithms."
                            f"fedavg(...)), got {type(algorithm).__name__}")
        train = check_not_empty(check_data("train", train), "train")
        if not is_in_memory(train):
            raise ValueError("a sweep keeps the population on the device, shared by its runs: "
                             "train must be in memory (not a memory-mapped or SQLite store)")
        if sampler is None:
            if cohort_size is None:
                raise TypeError("give cohort_size (clients per round) or a sampler")
            sampler = sampling.uniform(train.num_clients,
                                       check_integer("cohort_size", cohort_size, 1))
        elif not isinstance(sampler, sampling.Sampler):
            raise TypeError(f"sampler must be a fs.sampling.Sampler, got "
                            f"{type(sampler).__name__}")
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = list(range(check_integer("seeds", seeds, 1)))
        elif isinstance(seeds, Sequence) and seeds:
            seeds = [check_integer("seeds[]", s, 0, 2**32 - 1) for s in seeds]
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"seeds repeats a seed: {seeds}")
        else:
            raise TypeError(f"seeds must be a count or a non-empty list of seeds, got {seeds!r}")
        self.eval_every = check_integer("eval_every", eval_every, 0)
        eval_batch_size = check_integer("eval_batch_size", eval_batch_size, 1)
        eval_data = check_evaluation(eval_data, eval_every, eval_clients)
        if chunk_size is not None:
            check_integer("chunk_size", chunk_size, 1, sampler.max_size)
        if devices is not None:
            check_integer("devices", devices, 1, len(jax.local_devices()))
        if memory_budget is not None:
            memory_budget = check_integer("memory_budget", memory_budget, 1)
        self.output_dir = None if output_dir is None else check_output_dir(output_dir)
        # Each run gets its own sinks, so they are named, not given as objects.
        if not isinstance(sinks, str | None) and any(not isinstance(x, str) for x in sinks):
            raise TypeError(f"a sweep's sinks are sink names ({', '.join(sinks_lib.SINKS)}), "
                            "one set for each run's directory")
        sinks_lib.resolve(sinks, self.output_dir)  # unknown names, missing packages: now
        self.sinks, self._recorders = sinks, []

        base = params if params is not None else algorithm.model.init(jax.random.key(seeds[0]))
        template = algorithm.init(base, jax.random.key(seeds[0]))
        self.grid = check_grid(grid, template)
        self.runs = runs_of(self.grid, seeds)
        check_algorithm_fits(algorithm, train, base, sampler.max_size)
        self.ledgers = _ledgers(algorithm, sampler, self.runs, delta, accountant)

        self.algorithm, self.train, self.sampler, self.params = algorithm, train, sampler, params
        self.progress, self.memory_budget = progress, memory_budget or _default_budget()
        self.num_devices = devices or len(jax.local_devices())
        self.link_bits = _link_bits(algorithm, base)
        chunk_size_lib.use_compilation_cache()
        self.pool = resident_pool(train, None)
        self.evaluator, self._evaluators = None, {}
        if eval_data is not None:
            self._evaluator_args = dict(
                model=algorithm.model, data=eval_data, batch_size=eval_batch_size,
                num_clients=eval_clients, engine=Engine(1), name="eval_data",
                train=train if algorithm.personal else None, personal=algorithm.personal,
                client_state=algorithm.client_state, rolling=eval_rolling,
                personal_pass=algorithm.personal_pass)
            self.evaluator = self._evaluator(seeds[0])
            self.evaluator.check(base)
        if chunk_size is None:
            state = self._state(self.runs[0])
            chunk_size, _, _ = chunk_size_lib.cached_chunk_size(
                algorithm, train, sampler.max_size, state, sampler.sample(self.runs[0].seed, 0),
                seed=self.runs[0].seed, mesh=None, pool=self.pool,
                store=new_store(algorithm, train, state.params, Engine(1), "device"))
        self.chunk_size = chunk_size
        self.engine = Engine(chunk_size)
        self.runner = RoundRunner(algorithm, train, sampler.max_size, self.engine,
                                  self.runs[0].seed, None)
        self.timings = {"compile_s": 0.0, "rounds_s": 0.0, "eval_s": 0.0}

    # -- the program ----------------------------------------------------------------------
    def _state(self, run: Run) -> ServerState:
        params = (self.params if self.params is not None
                  else self.algorithm.model.init(jax.random.key(run.seed)))
        return set_values(self.algorithm.init(params, jax.random.key(run.seed)), run.values)

    def _program(self, mesh: jax.sharding.Mesh):
        runner, pool_size, stateful = self.runner, self.train.num_clients, self._stateful

        def group_round(states, stores, cohorts, pool):
            def one(state, store, cohorts):
                return runner.fn(state, store, RoundInputs(cohorts, pool, pool_size),
                                 engine=runner.engine)
            return jax.vmap(one)(states, stores, cohorts)

        runs = P(RUNS)
        sharded = jax.shard_map(group_round, mesh=mesh, in_specs=(runs, runs, runs, P()),
                                out_specs=runs, check_vma=False)
        return jax.jit(sharded, donate_argnums=(1,) if stateful else ())

    @property
    def _stateful(self) -> bool:
        return self.algorithm.client_state is not None

    def _pack(self, runs: list[Run], round_num: int):
        """The group's cohorts for `round_num`, each run's own, stacked over the run axis."""
        per_run = []
        for run in runs:
            cohorts, rows = self.runner.packer.pack(self.sampler.sample(run.seed, round_num),
                                                    seed=run.seed, round_num=round_num)
            per_run.append(tuple(resident_order(c, r) for c, r in zip(cohorts, rows,
                                                                     strict=True)))
        return jax.tree.map(lambda *xs: np.stack(xs), *per_run)

    def _layout(self, size: int) -> tuple[jax.sharding.Mesh, int]:
        """The mesh for groups of `size` runs and the padded group size (a multiple of it)."""
        devices = min(self.num_devices, size)
        mesh = jax.make_mesh((devices,), (RUNS,), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.local_devices()[:devices])
        return mesh, -(-size // devices) * devices

    def _inputs(self, runs: list[Run], mesh: jax.sharding.Mesh, size: int):
        """The group's runs padded to `size` (copies of its last, their results dropped) and
        their states and stores, stacked and split over the mesh's run axis."""
        runs = runs + [runs[-1]] * (size - len(runs))
        states = [self._state(r) for r in runs]
        stores = None
        if self._stateful:
            stores = _stack([new_store(self.algorithm, self.train, s.params, Engine(1),
                                       "device") for s in states])
        states, stores = jax.device_put((_stack(states), stores),
                                        NamedSharding(mesh, P(RUNS)))
        return runs, states, stores

    def _compile(self, size: int):
        """(the compiled program for groups of `size` runs, its mesh, padded size, pool).
        It is lowered on the inputs' shapes only: nothing of a group too large for the
        budget is allocated to find out that it is."""
        mesh, padded = self._layout(size)
        sharded = NamedSharding(mesh, P(RUNS))
        abstract = lambda x: jax.ShapeDtypeStruct((padded, *x.shape), x.dtype, sharding=sharded)
        state = jax.eval_shape(lambda: self._state(self.runs[0]))
        stores = None
        if self._stateful:
            row = jax.eval_shape(self.algorithm.client_state, state.params)
            stores = jax.eval_shape(lambda: client_store.ClientStore(
                jax.tree.map(lambda x: jnp.zeros((self.train.num_clients, *x.shape), x.dtype),
                             row), jnp.zeros((self.train.num_clients,), bool)))
        cohorts = self._pack(self.runs[:1], 0)
        cohorts = jax.tree.map(lambda x: abstract(jax.ShapeDtypeStruct(x.shape[1:], x.dtype)),
                               cohorts)
        pool = jax.device_put(self.pool, NamedSharding(mesh, P()))
        t = time.perf_counter()
        compiled = self._program(mesh).lower(
            jax.tree.map(abstract, state), jax.tree.map(abstract, stores), cohorts,
            pool).compile()
        self.timings["compile_s"] += time.perf_counter() - t
        return compiled, mesh, padded, pool

    def _groups(self):
        """The group size whose program fits the memory budget on each device (the whole
        sweep if it fits, else the size the first program's analysis allows) and that
        program: `(groups of run indices, compiled, mesh, padded size, pool)`."""
        n, size = len(self.runs), len(self.runs)
        while True:
            compiled, mesh, padded, pool = self._compile(size)
            per_device = padded // mesh.size
            used = _bytes(compiled)
            if used is None:
                used = _state_bytes(self, per_device)
            if used <= self.memory_budget or per_device == 1:
                break
            shared = sum(x.nbytes for x in jax.tree.leaves(self.pool))
            per_run = max(used - shared, 1) / per_device
            fit = max(int((self.memory_budget - shared) // per_run), 1)
            size = max(min(per_device - 1, fit), 1) * mesh.size
        groups = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        return groups, compiled, mesh, padded, pool

    # -- the rounds -----------------------------------------------------------------------
    def run(self, rounds: int) -> SweepResult:
        """Runs every run for `rounds` rounds, group by group, and returns the result."""
        rounds = check_integer("rounds", rounds, 0)
        start = time.perf_counter()
        groups, compiled, mesh, padded, pool = self._groups()
        program = (compiled, mesh, padded, pool)
        histories: list[list[dict]] = [[] for _ in self.runs]
        params, stores = [None] * len(self.runs), [None] * len(self.runs)
        if self.output_dir is not None:
            self._start_files()
        bar = tqdm(total=rounds * len(groups), desc="sweep rounds", unit="round",
                   disable=not self.progress)
        prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedjax_sim-sweep")
        try:
            for group in groups:
                self._run_group(group, program, rounds, histories, params, stores, start,
                                bar, prefetch)
        finally:
            bar.close()
            prefetch.shutdown(wait=True, cancel_futures=True)
            for recorder in self._recorders:
                recorder.close()
        self.timings["total_s"] = time.perf_counter() - start
        spent = None
        if self.ledgers is not None and rounds:
            spent = [self.ledgers[_noise(r)].summary(rounds) for r in self.runs]
        result = SweepResult(self.runs, histories, params,
                             stores if self._stateful else None, self.chunk_size, groups,
                             dict(self.timings), spent)
        if self.output_dir is not None:
            self._write(result, rounds)
        return result

    def _run_group(self, group, program, rounds, histories, params, stores, start, bar,
                   prefetch) -> None:
        compiled, mesh, padded, pool = program
        runs, states, store = self._inputs([self.runs[i] for i in group], mesh, padded)
        sharding = NamedSharding(mesh, P(RUNS))
        monitors = []
        for i in group:
            p = jax.tree.map(lambda x, i=i: x[group.index(i)], states.params)
            monitors.append(Monitor(sum(int(np.size(x)) for x in jax.tree.leaves(p)),
                                    float(tree_norm(p))))
        place = lambda r: jax.device_put(self._pack(runs, r), sharding)
        upcoming = prefetch.submit(place, 0) if rounds else None
        for r in range(rounds):
            cohorts = upcoming.result()
            if r + 1 < rounds:
                upcoming = prefetch.submit(place, r + 1)
            t = time.perf_counter()
            states, store, metrics = compiled(states, store, cohorts, pool)
            metrics = jax.device_get(metrics)
            wall = time.perf_counter() - start
            for j, i in enumerate(group):
                record = _round_record(r, jax.tree.map(lambda x, j=j: x[j], metrics),
                                       self.train, wall, self.chunk_size)
                record.update(self.link_bits)
                if self.ledgers is not None:
                    record["epsilon"] = self.ledgers[_noise(self.runs[i])].epsilon(r + 1)
                monitors[j].check(record)
                histories[i].append(record)
            self.timings["rounds_s"] += time.perf_counter() - t
            if self.evaluator is not None and (
                    r + 1 == rounds or (self.eval_every and (r + 1) % self.eval_every == 0)):
                self._evaluate(group, states, store, r + 1, histories)
            if self.output_dir is not None:
                for i in group:
                    self._recorders[i].write(histories[i][-1], histories[i])
            bar.update(1)
        host = jax.device_get(states.params)
        for j, i in enumerate(group):
            params[i] = jax.tree.map(lambda x, j=j: x[j], host)
            if self._stateful:
                stores[i] = jax.tree.map(lambda x, j=j: x[j], store)

    def _evaluator(self, seed: int) -> Evaluator:
        """Run `seed`'s evaluator: the evaluator seeds its client sample and its personal
        passes' shuffles as `Simulation(seed=seed)`'s does, so a seed that changes neither
        shares the first one's."""
        if self._evaluators and not self._evaluator_args["train"] and (
                self._evaluator_args["num_clients"] in (None, self._evaluator_args[
                    "data"].num_clients)):
            return next(iter(self._evaluators.values()))
        if seed not in self._evaluators:
            self._evaluators[seed] = Evaluator(seed=seed, **self._evaluator_args)
        return self._evaluators[seed]

    def _evaluate(self, group, states, store, round_num, histories) -> None:
        """Each run's evaluation, one run after another through the one compiled evaluation
        program (`evaluation_record`, so the records are `Simulation`'s)."""
        t = time.perf_counter()
        host = jax.device_get(states.params)
        for j, i in enumerate(group):
            own = None if store is None else jax.tree.map(lambda x, j=j: x[j], store)
            histories[i][-1].update(evaluation_record(
                self._evaluator(self.runs[i].seed), {}, jax.tree.map(lambda x, j=j: x[j], host),
                own, round_num))
        self.timings["eval_s"] += time.perf_counter() - t

    # -- output ---------------------------------------------------------------------------
    def _start_files(self) -> None:
        """Each run's directory and its sinks, opened empty (a rerun starts them over)."""
        self._recorders = []
        for run in self.runs:
            path = self.output_dir / run.name
            path.mkdir(parents=True, exist_ok=True)
            recorder = sinks_lib.Recorder(sinks_lib.resolve(self.sinks, path), path)
            recorder.open([])
            self._recorders.append(recorder)

    def _write(self, result: SweepResult, rounds: int) -> None:
        from flax import serialization

        entries = []
        for i, run in enumerate(self.runs):
            path = self.output_dir / run.name
            final = result.histories[i][-1] if result.histories[i] else {}
            summary = {"name": run.name, "rounds": rounds, "seed": run.seed,
                       "values": run.values, "chunk_size": self.chunk_size,
                       "seconds": result.timings, "train_loss": final.get("train_loss"),
                       "eval": final.get("eval"), "eval_personal": final.get("eval_personal"),
                       "privacy": None if result.privacy is None else result.privacy[i],
                       "uplink_bits": self.link_bits["uplink_bits"],
                       "downlink_bits": self.link_bits["downlink_bits"]}
            (path / "summary.json").write_text(json.dumps(summary, indent=2))
            (path / "params.msgpack").write_bytes(
                serialization.msgpack_serialize(jax.tree.map(np.asarray, result.params[i])))
            entries.append({"name": run.name, "seed": run.seed, "values": run.values})
        sweep = {"grid": self.grid, "seeds": sorted({r.seed for r in self.runs}),
                 "rounds": rounds, "chunk_size": self.chunk_size, "groups": result.groups,
                 "runs": entries}
        (self.output_dir / "sweep.json").write_text(json.dumps(sweep, indent=2))


def simulate_sweep(algorithm: FederatedAlgorithm, train: FederatedData, *, rounds: int,
                   **kwargs) -> SweepResult:
    """`Sweep(algorithm, train, **kwargs).run(rounds)`: every run of `seeds` x `grid` for
    `rounds` rounds, vmapped in one program. See `Sweep` for the arguments.

    Example:
      >>> res = simulate_sweep(algo, train, rounds=50, cohort_size=100, seeds=4,
      ...                      grid={"client_lr": [0.01, 0.1]})          # doctest: +SKIP
    """
    return Sweep(algorithm, train, **kwargs).run(rounds)


def _noise(run: Run) -> float | None:
    return run.values.get("noise_multiplier")


def _ledgers(algorithm, sampler, runs, delta, accountant) -> dict | None:
    """One privacy ledger per distinct noise multiplier of the runs (None: no DP stage)."""
    event = getattr(algorithm.aggregator, "privacy", None)
    if event is None:
        given = [n for n, v in (("delta", delta), ("accountant", accountant)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} given, but the aggregation chain has no DP "
                             "stage to account for (e.g. fs.aggregators.dp_mean)")
        return None
    if len(algorithm.passes) > 1:
        raise ValueError(f"the privacy accounting covers one aggregation per round; this "
                         f"algorithm aggregates {len(algorithm.passes)} times a round")
    ledgers = {}
    for z in {_noise(r) for r in runs}:
        fn = event if z is None else _with_noise(event, z)
        ledgers[z] = privacy.Ledger(fn, sampler.participation, delta=delta,
                                    accountant=accountant, sampler_name=sampler.name)
    return ledgers


def _with_noise(event, z: float):
    import inspect

    if "noise_multiplier" not in inspect.signature(event).parameters:
        raise ValueError("the chain's privacy accounting cannot follow a swept noise "
                         "multiplier (more than one DP stage, or one that fixes its own): "
                         "sweep noise_multiplier with a single fs.aggregators.dp_mean")
    return lambda participation, rounds: event(participation, rounds, noise_multiplier=z)


def _stack(trees: list):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _bytes(compiled) -> int | None:
    """The bytes one device holds for the program: arguments, outputs (less what they alias)
    and temporaries, from XLA's memory analysis; None where the backend gives none."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


def _state_bytes(sweep: Sweep, runs: int) -> int:
    """Without a memory analysis: `runs` runs' states and stores, and the shared population."""
    state = jax.eval_shape(lambda: sweep._state(sweep.runs[0]))
    row = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    if sweep._stateful:
        table = jax.eval_shape(sweep.algorithm.client_state, state.params)
        row += sweep.train.num_clients * sum(math.prod(x.shape) * x.dtype.itemsize
                                             for x in jax.tree.leaves(table))
    return runs * row + sum(x.nbytes for x in jax.tree.leaves(sweep.pool))


def _default_budget() -> int:
    memory = device_memory()
    return memory * 3 // 4 if memory else 4 << 30
