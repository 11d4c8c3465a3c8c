"""`Simulation`: a federated run that steps round by round, checkpoints, and resumes.

Every random choice derives from one seed: round r's cohort from (seed, r), the shuffles from
(seed, r, client id), the training keys from the state's key folded with r and the client id.
So a run is reproducible whatever the chunk size or device count (to float summation order),
and a run resumed from a checkpoint gives the same bits as one never stopped: the checkpoint
holds the server state (its key and round included), the client store, the chunk size and
the history, and the sampler's position is the round number.

`simulate()` is `Simulation(...).run(rounds)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from fedjax_sim import chunk_size as chunk_size_lib
from fedjax_sim import compression, privacy, sampling
from fedjax_sim import sinks as sinks_lib
from fedjax_sim.algorithms.base import FederatedAlgorithm, ServerState, tree_norm
from fedjax_sim.checkpoints import Checkpoints
from fedjax_sim.checks import (
    check_algorithm_fits,
    check_bool,
    check_data,
    check_evaluation,
    check_integer,
    check_mesh,
    check_not_empty,
    check_output_dir,
)
from fedjax_sim.client_store import HostStore
from fedjax_sim.data.cohort import planned_work
from fedjax_sim.data.device_cohort import check_packable
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.data.storage import is_in_memory
from fedjax_sim.devices import DeviceModel, RoundPlan
from fedjax_sim.engine import Engine, replicate
from fedjax_sim.evaluation import Evaluator, FineTune, fairness
from fedjax_sim.health import DivergedError, Monitor
from fedjax_sim.rounds import RoundRunner, ScanRunner, new_store, resident_limit, resident_pool

# A callback sees the simulation and each round's record; a truthy return stops the run.
Callback = Callable[["Simulation", dict], Any]


@dataclasses.dataclass
class SimulationResult:
    """What a run returns.

    Attributes:
      params: the final server params.
      state: the final server state (params, optimizer and aggregator state, round, key).
      history: one dict per round: "round", "wall_time", "train_loss" (NaN when every
        client was excluded), "num_included", "num_excluded", "excluded_clients",
        "update_norm" and "params_norm" (the server's), "outlier_clients" (clients whose
        update norm is far above the cohort's, `health.outliers`), "chunk_size",
        "step_efficiency" (useful over executed local steps: a vmapped chunk runs to its
        longest client), "server" (the aggregator's round metrics), "clients" (per-client
        train metrics and update norms), and on evaluation rounds "eval" (summary) and
        "eval_clients" (per-client metrics). With a device model: "virtual_time" (the
        simulated federation's clock at the round's end, seconds), "round_time",
        "num_sampled", "num_dropped", "num_late" (and "num_partial", "num_unselected",
        "num_available" where they apply: `fs.devices.DeviceModel.record`), and each
        counted client's "client_time" in "clients".
      chunk_size: the vectorization width K used.
      chunk_size_source: "given" (passed in), "cache" (an earlier run's choice for the same
        program on the same devices), "search" (timed on the first cohort) or
        "checkpoint" (a resumed run's).
      timings: seconds spent in "chunk_size_choice_s" (the cache lookup, or the search and
        its compiles), "compile_s" (the round program; 0 when the search compiled it),
        "rounds_s" (the rounds, evaluation apart), "eval_s" (evaluation, its compile
        included) and "total_s".
      store: the client store (None for a stateless algorithm).
      privacy: for a chain with a DP stage, the guarantee spent: "epsilon" at "delta" by
        the "accountant", under the neighbouring "relation", after "rounds" rounds, and
        "target_epsilon"; None otherwise.
    """

    params: Any
    state: ServerState
    history: list[dict]
    chunk_size: int
    chunk_size_source: str = "given"
    timings: dict = dataclasses.field(default_factory=dict)
    store: Any = None
    privacy: dict | None = None


class Simulation:
    """A run of `algorithm` on `train`, round by round.

    Args:
      algorithm: e.g. `fs.algorithms.fedavg(...)`.
      train: the training population.
      cohort_size: clients per round, uniformly without replacement; or give `sampler`.
      sampler: a `fs.sampling` sampler (Poisson, with replacement, by size).
      seed: the one seed every random choice derives from.
      params: initial params; default `algorithm.model.init(key(seed))`.
      eval_data: population to evaluate every `eval_every` rounds and after a run's last.
      eval_clients: evaluate this many clients of `eval_data`: a fixed seeded sample, or with
        `eval_rolling` a fresh one at each evaluation (seeded by the round); each summary's
        "mean_ci95" bounds the population's client mean. Records hold each evaluated
        client's metrics ("eval_clients") and fairness figures ("eval_fairness": spread,
        accuracy by client size; for personal models, the share of clients they help).
      fine_tune: `fs.evaluation.FineTune(optimizer, steps)`: each evaluation also fine-tunes
        every evaluated client on its own split of `train` (from the global params, or the
        algorithm's personal model) and evaluates that; records then hold "eval_personal"
        (and its per-client values) beside "eval", as they do for an algorithm with a
        personal model.
      eval_extra: `{name: data}`, more test sets the global model is evaluated on at each
        evaluation, recorded as `record[name]` (each metric's pooled mean over the set's
        examples): an attack's success set (`fs.attacks.DataAttack.success_data`), an
        out-of-distribution split.
      chunk_size: the vectorization width K. None: the K an earlier run chose for the same
        round program on the same devices (`chunk_size` module), else the fastest of a few
        timed on the first cohort (then kept for the next run). The K used is in the result
        and every history record: passing it reproduces the run.
      mesh: a mesh with a "clients" axis (`fs.client_mesh()`) to split cohorts over devices.
      resident: keep `train` on the device; default when it is in memory and takes under
        2 GiB on a CPU, or under a quarter of an accelerator's memory (`resident_limit`).
        Otherwise each round reads its cohort's rows (from memory, a memory-mapped file or
        SQLite), on a background thread while the previous round runs.
      client_store: where a stateful algorithm's per-client states live: "device", "host"
        (host memory; each round sends its cohort's rows), a directory (host, memory-mapped
        `.npy` files there), or None: on the device when the table fits `resident_limit`.
      output_dir: where the sinks' files (written as the run goes) and `checkpoints/` go.
      sinks: where the records go, in `output_dir`: names ("jsonl", "csv", "tensorboard",
        "wandb") or `fs.sinks.Sink` objects (`fs.sinks`); default "jsonl" (history.jsonl
        and clients.jsonl, the per-client metrics of each evaluation) when there is an
        `output_dir`. A resumed run's sinks hold each round once.
      checkpoint_every: with `output_dir`, a checkpoint every this many rounds (0: only at
        the end of a run and when it is stopped by SIGTERM or Ctrl-C); the newest
        `keep_checkpoints` are kept.
      resume: continue from the newest checkpoint in `output_dir` (refused, naming the
        difference, if it is from another configuration).
      progress: show a tqdm progress bar with rounds/s and the latest metrics.
      callbacks: `(simulation, record) -> stop?` after each round; a truthy return ends
        the run after that round (early stopping).
      delta: for an aggregation chain with a DP stage (`fs.aggregators.dp_mean`, ...), a
        `fs.privacy.Ledger` accounts for every round under the sampler's participation (a
        sampler no accountant covers is refused): each record has its "epsilon" at `delta`
        (default 1 / N^1.1 for N clients; one of 1 / N or more is warned about).
      target_epsilon: with a DP stage, the run stops before a round that would spend more.
      accountant: with a DP stage, "rdp" (default; about 0.07 s a round, on the background
        thread) or "pld" (tighter, about 1 s a round).
      devices: a `fs.devices.DeviceModel`: per-client device profiles and the round policy
        (deadline, over-selection, dropouts, availability) on a virtual clock. Clients that
        do not report become padding and a cut-off client's steps are capped when the
        cohort is packed, so the compiled round stays one program. Over-selection and
        availability draw the cohort themselves (uniformly among the available clients):
        give `cohort_size` (the clients counted), not a sampler.
      rounds_per_call: run this many rounds in one compiled program (a `lax.scan` whose
        rounds draw their cohorts with `jax.random` and pack them on the device), so a small
        model pays no host round trip a round; the records, evaluations (every
        `eval_every`), checkpoints and health checks are those of a run round by round with
        `sampler=fs.sampling.on_device(N, cohort_size)`, which is the sampler used (give
        `cohort_size`, or an on-device sampler). A call ends at every evaluation and
        checkpoint round; its records all carry the call's "wall_time", and callbacks,
        signals and a diverged run stop it only after the call. Needs a resident population
        and a device client store; refuses a device model and a target epsilon.
    """

    def __init__(self, algorithm: FederatedAlgorithm, train: FederatedData, *,
                 cohort_size: int | None = None, sampler: sampling.Sampler | None = None,
                 seed: int = 0, params: Any = None, eval_data: FederatedData | None = None,
                 eval_every: int = 0, eval_clients: int | None = None,
                 eval_batch_size: int = 64, eval_rolling: bool = False,
                 fine_tune: FineTune | None = None,
                 eval_extra: dict[str, FederatedData] | None = None,
                 chunk_size: int | None = None,
                 mesh: jax.sharding.Mesh | None = None, resident: bool | None = None,
                 client_store: str | os.PathLike | None = None,
                 output_dir: str | os.PathLike | None = None,
                 sinks: str | Sequence[str | sinks_lib.Sink] | None = None,
                 checkpoint_every: int = 0, keep_checkpoints: int = 3,
                 resume: bool = False, progress: bool = True,
                 callbacks: Sequence[Callback] = (), delta: float | None = None,
                 target_epsilon: float | None = None,
                 accountant: privacy.Accountant | None = None,
                 devices: DeviceModel | None = None, rounds_per_call: int = 1):
        if not isinstance(algorithm, FederatedAlgorithm):
            raise TypeError(f"algorithm must be a FederatedAlgorithm (e.g. fs.algorithms."
                            f"fedavg(model, optax.sgd(0.1))), got {type(algorithm).__name__}")
        train = check_not_empty(check_data("train", train), "train")
        self.rounds_per_call = check_integer("rounds_per_call", rounds_per_call, 1)
        if rounds_per_call > 1:
            check_packable(train, algorithm.passes)
            sampler = _scan_sampler(train, sampler, cohort_size, devices=devices,
                                    target_epsilon=target_epsilon, resident=resident,
                                    client_store=client_store)
        self.devices = devices
        if devices is not None:
            sampler, self._target = _device_sampler(devices, train, sampler, cohort_size)
        if sampler is None:
            if cohort_size is None:
                raise TypeError("give cohort_size (clients per round) or a sampler")
            sampler = sampling.uniform(train.num_clients, check_integer("cohort_size",
                                                                        cohort_size, 1))
        elif not isinstance(sampler, sampling.Sampler):
            raise TypeError(f"sampler must be a fs.sampling.Sampler, got "
                            f"{type(sampler).__name__}")
        # JAX keys take 32 bits of a seed without x64: 2**32 would train as seed 0 does.
        seed = check_integer("seed", seed, 0, 2**32 - 1)
        eval_every = check_integer("eval_every", eval_every, 0)
        eval_batch_size = check_integer("eval_batch_size", eval_batch_size, 1)
        self.checkpoint_every = check_integer("checkpoint_every", checkpoint_every, 0)
        keep_checkpoints = check_integer("keep_checkpoints", keep_checkpoints, 1)
        progress, resume = check_bool("progress", progress), check_bool("resume", resume)
        if resident is not None:
            resident = check_bool("resident", resident)
        check_mesh(mesh)
        eval_data = check_evaluation(eval_data, eval_every, eval_clients)
        devices = 1 if mesh is None else mesh.shape["clients"]
        per_device = -(-sampler.max_size // devices)
        if chunk_size is not None and check_integer("chunk_size", chunk_size, 1) > per_device:
            raise ValueError(
                f"chunk_size {chunk_size} is larger than the {per_device} client(s) per device "
                f"(cohort {sampler.max_size} over {devices} device(s)): the rest of every chunk "
                f"would be padding; use chunk_size <= {per_device}")
        if output_dir is not None:
            output_dir = check_output_dir(output_dir)
        elif resume:
            raise ValueError("resume=True needs the output_dir holding the checkpoints")
        sinks = sinks_lib.resolve(sinks, output_dir)
        if params is None:
            try:
                params = algorithm.model.init(jax.random.key(seed))
            except TypeError as e:
                raise TypeError(f"model.init(key) failed ({e}): a Model's init takes one PRNG "
                                "key and returns the params") from e
        if resident is None:
            resident = is_in_memory(train) and train.nbytes <= resident_limit()
            if rounds_per_call > 1 and not resident:
                raise ValueError("rounds_per_call > 1 needs train resident on the device, but "
                                 "it is streamed (not in memory) or over resident_limit(); use "
                                 "rounds_per_call=1")
        check_algorithm_fits(algorithm, train, params, sampler.max_size, finite=resident)
        self.ledger = _ledger(algorithm, sampler, delta, target_epsilon, accountant)

        self.algorithm, self.train, self.sampler, self.seed = algorithm, train, sampler, seed
        self.eval_every, self.output_dir, self.progress = eval_every, output_dir, progress
        self.callbacks = tuple(callbacks)
        self.timings = {"chunk_size_choice_s": 0.0, "compile_s": 0.0, "rounds_s": 0.0,
                        "eval_s": 0.0}
        self._start = time.perf_counter()
        chunk_size_lib.use_compilation_cache()
        one = Engine(1, mesh)
        self.state = replicate(algorithm.init(params, jax.random.key(seed)), one)
        if client_store in ("device", "host", None):
            where = client_store
        elif isinstance(client_store, (str, os.PathLike)):
            where = check_output_dir(client_store, "client_store")
        else:
            raise TypeError(f"client_store must be 'device', 'host', a directory or None, got "
                            f"{client_store!r}"[:200])
        self.store = new_store(algorithm, train, params, one, where)
        if rounds_per_call > 1 and isinstance(self.store, HostStore):
            raise ValueError("rounds_per_call > 1 needs the client store on the device; its "
                             "table is over resident_limit(), so it went to the host: use "
                             "rounds_per_call=1")
        self.round, self.history = 0, []
        self.link_bits = _link_bits(algorithm, params)
        if devices is not None:  # what each client downloads and uploads, for its clock
            self._download_bytes = self.link_bits["downlink_bits"] / 8
            self._upload_bytes = self.link_bits["uplink_bits"] / 8
            self._plans: dict[int, RoundPlan] = {}
            self._plan_lock = threading.Lock()
        self.monitor = Monitor(sum(int(np.size(x)) for x in jax.tree.leaves(params)),
                               float(tree_norm(params)))
        self.resident = resident  # the population on the device (else read per cohort)
        self.pool = resident_pool(train, mesh) if resident else None
        self.mesh = mesh
        self.evaluator = None
        if eval_data is not None:  # checked against the params now, not after the training
            own = fine_tune is not None or algorithm.personal is not None
            self.evaluator = Evaluator(algorithm.model, eval_data, batch_size=eval_batch_size,
                                       num_clients=eval_clients, engine=one, seed=seed,
                                       name="eval_data", train=train if own else None,
                                       fine_tune=fine_tune, personal=algorithm.personal,
                                       client_state=algorithm.client_state,
                                       rolling=eval_rolling,
                                       personal_pass=algorithm.personal_pass)
            self.evaluator.check(params)
        elif fine_tune is not None:
            raise ValueError("fine_tune needs eval_data (the clients' test splits)")
        if eval_extra and self.evaluator is None:
            raise ValueError("eval_extra needs eval_data (it is evaluated beside it)")
        self.extra_evaluators = {}
        for name, data in (eval_extra or {}).items():
            if not isinstance(name, str) or name in _RECORD_KEYS:
                raise ValueError(f"eval_extra: {name!r} must be a string other than a record's "
                                 f"own keys {sorted(_RECORD_KEYS)}")
            self.extra_evaluators[name] = Evaluator(
                algorithm.model, check_not_empty(check_data(name, data), name),
                batch_size=eval_batch_size, engine=one, seed=seed, name=name)
            self.extra_evaluators[name].check(params)

        first = sampler.sample(seed, 0)
        self.fingerprint = None
        self.checkpoints = None
        restored = None
        if output_dir is not None:
            self.fingerprint = self._fingerprint(first)
            self.checkpoints = Checkpoints(output_dir / "checkpoints", keep_checkpoints)
            if resume:
                restored = self._restore()
            elif self.checkpoints.rounds():
                raise ValueError(f"output_dir {str(output_dir)!r} holds checkpoints of an "
                                 "earlier run: pass resume=True to continue it, or another "
                                 "output_dir")
        if devices is not None:  # the clock before the next round: the last record's end
            last = self.history[-1].get("virtual_time", 0.0) if self.history else 0.0
            self._clock = {self.round: float(last)}
        runner, source = None, "given"
        if restored is not None:
            chunk_size, source = restored, "checkpoint"
        elif chunk_size is None:
            t = time.perf_counter()
            chunk_size, source, runner = chunk_size_lib.cached_chunk_size(
                algorithm, train, sampler.max_size, self.state, first, seed=seed, mesh=mesh,
                pool=self.pool, store=self.store)
            self.timings["chunk_size_choice_s"] = time.perf_counter() - t
        if runner is None or self.store is not None:  # a store's buffers are donated
            runner = RoundRunner(algorithm, train, sampler.max_size, Engine(chunk_size, mesh),
                                 seed, self.pool, donate=self.store is not None)
        self.runner, self.chunk_size, self.chunk_size_source = runner, chunk_size, source
        self.scanner = (ScanRunner(runner, sampler, rounds_per_call) if rounds_per_call > 1
                        else None)
        self.recorder = None if not sinks else sinks_lib.Recorder(sinks, output_dir)
        if self.recorder is not None:
            earlier = self.recorder.existing()
            if not resume and earlier:
                warnings.warn(f"output_dir {str(output_dir)!r} holds an earlier run's "
                              f"{', '.join(earlier)}; this run overwrites it", stacklevel=2)
            self.recorder.open(self.history)
        self._stop: int | None = None
        self._saved: int | None = None  # the round of this run's newest checkpoint

    # -- one round ------------------------------------------------------------------------
    def pack(self, round_num: int):
        """Round `round_num`'s device inputs (sampled, read and packed on the host)."""
        if self.devices is None:
            return self.runner.pack(self.sampler.sample(self.seed, round_num), round_num)
        plan = self.plan(round_num)
        return self.runner.pack(plan.ids, round_num, plan.max_steps)

    def plan(self, round_num: int) -> RoundPlan:
        """Round `round_num`'s device plan (with a device model): who reports, their step
        budgets and the virtual clock. A plan depends on (seed, round, the clock at the
        round's start) only, and the clock on the plans before it, so round r + 1's is known
        before round r runs (the prefetch thread packs it meanwhile)."""
        if self.devices is None:
            raise ValueError("plan needs a Simulation with devices=fs.devices.DeviceModel(...)")
        with self._plan_lock:
            known = [k for k in self._clock if k <= round_num]
            if not known:
                raise ValueError(f"round {round_num} is before this run's first known virtual "
                                 f"clock (round {min(self._clock)})")
            for k in range(max(known), round_num + 1):
                if k not in self._plans:
                    self._plans[k] = self._new_plan(k, self._clock[k])
                    self._clock[k + 1] = self._plans[k].end
            return self._plans[round_num]

    def _new_plan(self, round_num: int, clock: float) -> RoundPlan:
        model, seed = self.devices, self.seed
        if model.selects:
            ids, available = model.select(self._target, seed=seed, round_num=round_num,
                                          clock=clock)
            target = self._target
        else:
            ids, available = np.asarray(self.sampler.sample(seed, round_num), np.int64), None
            target = len(ids)
        shapes = self.runner.packer.shapes
        # The other passes (Mime's full-batch gradient) cost their examples; no cap cuts them.
        examples = [planned_work(self.train, ids, b, shape.batch_size, seed=seed,
                                 round_num=round_num)[1]
                    for b, shape in zip(self.algorithm.passes[:-1], shapes[:-1], strict=True)]
        steps, _ = planned_work(self.train, ids, self.algorithm.passes[-1],
                                shapes[-1].batch_size, seed=seed, round_num=round_num)
        return model.plan(ids, steps, seed=seed, round_num=round_num, start=clock,
                          target=target, batch_size=shapes[-1].batch_size,
                          download_bytes=self._download_bytes,
                          upload_bytes=self._upload_bytes, fixed_examples=sum(examples),
                          num_available=available)

    def compile(self, packed=None) -> float:
        """Compiles the program `run` runs (the round program, for `packed`, default the
        next round's inputs; with `rounds_per_call` > 1 the scanned rounds') unless it is
        compiled already (a search's winner is); returns the seconds it took."""
        if self.scanner is not None and packed is None:
            if self.scanner.compiled is not None:
                return 0.0
            seconds = self.scanner.compile(self.state, self.store)
            self.timings["compile_s"] += seconds
            return seconds
        return self._compile_round(packed)

    def _compile_round(self, packed=None) -> float:
        if self.runner.compiled is not None:
            return 0.0
        packed = self.pack(self.round) if packed is None else packed
        seconds = self.runner.compile(self.state, self.store, packed)
        self.timings["compile_s"] += seconds
        return seconds

    def memory_analysis(self):
        """XLA's memory analysis of the compiled round program (`temp_size_in_bytes`: the
        temporary buffers a round needs), compiling it first if needed; None where the
        backend gives none."""
        self._compile_round()
        return self.runner.compiled.memory_analysis()

    def step(self, packed=None, *, evaluate: bool | None = None) -> dict:
        """Runs one round (on `packed`, default packed now) and returns its record."""
        record = self._round(packed, evaluate)
        self._commit(record)
        return record

    def _round(self, packed, evaluate: bool | None) -> dict:
        """Runs one round and appends its record to the history."""
        r = self.round
        if self._over_budget(r + 1):
            raise RuntimeError(f"round {r} would spend epsilon {self.ledger.epsilon(r + 1):.4g}"
                               f", past the target {self.ledger.target_epsilon:g}")
        packed = self.pack(r) if packed is None else packed
        self._compile_round(packed)
        t = time.perf_counter()
        self.state, self.store, metrics = self.runner(self.state, self.store, packed)
        plan = None
        if self.devices is not None:
            plan = self.plan(r)
            with self._plan_lock:  # the plans and clocks before this round are spent
                for k in [k for k in self._plans if k <= r]:
                    del self._plans[k]
                for k in [k for k in self._clock if k <= r]:
                    del self._clock[k]
        record = _round_record(r, metrics, self.train, time.perf_counter() - self._start,
                               self.chunk_size, plan)
        record.update(self.link_bits)
        if plan is not None:
            record.update(self.devices.record(plan))
        self.timings["rounds_s"] += time.perf_counter() - t
        return self._keep(record, evaluate)

    def _keep(self, record: dict, evaluate: bool | None) -> dict:
        """The rest of a round once its record is built (a scanned call's rounds come here
        one by one): accounting, health checks, evaluation, history, checkpoint."""
        self.round = record["round"] + 1
        if self.ledger is not None:
            record["epsilon"] = self.ledger.epsilon(self.round)
        self.monitor.check(record)
        if evaluate is None:
            evaluate = bool(self.eval_every) and self.round % self.eval_every == 0
        if evaluate and self.evaluator is not None:
            t = time.perf_counter()
            record.update(self._evaluate())
            self.timings["eval_s"] += time.perf_counter() - t
        self.history.append(record)
        return record

    def _commit(self, record: dict) -> None:
        """The round's record final: to the sinks, then its checks and checkpoint."""
        if self.recorder is not None:
            self.recorder.write(record, self.history)
        _check_secure_aggregation(record)
        if self.checkpoints is not None and self.checkpoint_every and \
                self.round % self.checkpoint_every == 0:
            self.save()
        if self.monitor.stuck:
            error = self.monitor.stuck
            error.result = self.result()
            raise error

    # -- many rounds ----------------------------------------------------------------------
    def run(self, num_rounds: int) -> SimulationResult:
        """Runs `num_rounds` more rounds (evaluating after the last) and returns the result.

        Round r+1 is sampled, read and packed (and its epsilon accounted) on a background
        thread while round r runs. A run with a target epsilon stops before the round that
        would pass it. SIGTERM or Ctrl-C stops the run after the round in progress, with a
        checkpoint when there is an `output_dir`, then raises (SystemExit 143,
        KeyboardInterrupt); a second Ctrl-C interrupts at once.
        """
        num_rounds = check_integer("rounds", num_rounds, 0)
        end = self.round + num_rounds
        if self.ledger is not None and num_rounds:
            self.ledger.epsilon(end)  # a mechanism built for fewer rounds refuses them now
        prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedjax_sim-prefetch")
        restore_signals = self._catch_signals()
        bar = tqdm(total=num_rounds, desc="rounds", unit="round", disable=not self.progress)
        try:
            if self.scanner is not None:  # leaves nothing to the round-by-round loop
                end = self._run_scanned(end, bar)
            upcoming = (prefetch.submit(self._prepare, self.round, end) if self.round < end
                        else None)
            while self.round < end and not self._over_budget(self.round + 1):
                packed = upcoming.result()
                last = self.round + 1 == end or self._over_budget(self.round + 2)
                if not last:
                    upcoming = prefetch.submit(self._prepare, self.round + 1, end)
                record = self._round(packed, evaluate=True if last else None)
                bar.update(1)
                bar.set_postfix(_postfix(record), refresh=False)
                stop = any([bool(cb(self, record)) for cb in self.callbacks])
                # An early stop evaluates its last round before the sinks see the record.
                if stop and not last and self.evaluator is not None and "eval" not in record:
                    record.update(self._evaluate())
                self._commit(record)
                if self._stop is not None or last or stop:
                    break
            if self.checkpoints is not None and self._saved != self.round:
                self.save()
        finally:
            bar.close()
            prefetch.shutdown(wait=True, cancel_futures=True)
            restore_signals()
            if self.recorder is not None:
                self.recorder.close()
        if self._stop is not None:
            signum, self._stop = self._stop, None
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        return self.result()

    def _run_scanned(self, end: int, bar) -> int:
        """Rounds up to `end` in calls of the scanned program, each ending at an evaluation
        or checkpoint round at the latest; each round's record is then kept as `step` keeps
        it. Returns the round the run stopped at (`end`, or earlier when stopped)."""
        self.compile()
        while self.round < end:
            count = min(self.rounds_per_call, end - self.round)
            for every, on in ((self.eval_every, self.evaluator is not None),
                              (self.checkpoint_every, self.checkpoints is not None)):
                if every and on:
                    count = min(count, every - self.round % every)
            t = time.perf_counter()
            self.state, self.store, stacked = self.scanner(self.state, self.store, count)
            stacked = _to_host(stacked)  # one transfer for the call's rounds
            wall = time.perf_counter() - self._start
            records = [_round_record(self.round + i, jax.tree.map(lambda a, i=i: a[i], stacked),
                                     self.train, wall, self.chunk_size) for i in range(count)]
            self.timings["rounds_s"] += time.perf_counter() - t
            diverged, stop = None, False
            for record in records:
                record.update(self.link_bits)
                self._keep(record, True if record["round"] + 1 == end else None)
                bar.update(1)
                bar.set_postfix(_postfix(record), refresh=False)
                if diverged is None:
                    stop = any([bool(cb(self, record)) for cb in self.callbacks]) or stop
                # An early stop evaluates the call's last round before the sinks see it.
                if (stop and record is records[-1] and self.evaluator is not None
                        and "eval" not in record):
                    record.update(self._evaluate())
                try:
                    self._commit(record)
                except DivergedError as e:  # the call ran on: keep its rounds, then raise
                    diverged = diverged or e
            if diverged is not None:
                diverged.result = self.result()
                raise diverged
            if self._stop is not None or stop:
                break
        return self.round

    def result(self) -> SimulationResult:
        self.timings["total_s"] = time.perf_counter() - self._start
        spent = None if self.ledger is None else self.ledger.summary(self.round)
        return SimulationResult(params=_to_host(self.state.params), state=self.state,
                                history=self.history, chunk_size=self.chunk_size,
                                chunk_size_source=self.chunk_size_source,
                                timings=dict(self.timings), store=self.store, privacy=spent)

    def _evaluate(self) -> dict:
        """The record's evaluation (`evaluation_record`)."""
        return evaluation_record(self.evaluator, self.extra_evaluators, self.state.params,
                                 self.store, self.round)

    def _over_budget(self, rounds: int) -> bool:
        return self.ledger is not None and self.ledger.over(rounds)

    def _prepare(self, round_num: int, end: int):
        """`pack(round_num)`, with the epsilon after it and after the next (up to round `end`)
        accounted beside it: the loop asks for both before it runs the round."""
        if self.ledger is not None:
            for rounds in range(round_num + 1, min(round_num + 2, end) + 1):
                self.ledger.epsilon(rounds)
        return self.pack(round_num)

    # -- checkpoints ----------------------------------------------------------------------
    def save(self) -> None:
        """Writes a checkpoint of the rounds completed so far (needs an output_dir)."""
        if self.checkpoints is None:
            raise ValueError("save needs the Simulation's output_dir")
        meta = {"round": self.round, "chunk_size": self.chunk_size,
                "fingerprint": self.fingerprint, "history": self.history,
                "monitor": self.monitor.snapshot()}
        self.checkpoints.save(self.round, self.state, self.store, meta)
        self._saved = self.round

    def _restore(self) -> int | None:
        """Loads the newest checkpoint; returns its chunk size (None when there is none)."""
        found = self.checkpoints.restore(self.state, self.store)
        if found is None:
            return None
        state, store, meta = found
        if meta["fingerprint"] != self.fingerprint:
            then, now = meta["fingerprint"], self.fingerprint
            diff = [f"{k}: checkpoint {then.get(k)!r}, now {now.get(k)!r}"
                    for k in {**then, **now} if then.get(k) != now.get(k)]
            raise ValueError(f"the checkpoints in {self.checkpoints.directory} are from "
                             f"another configuration ({'; '.join(diff)}): resume with the "
                             "same algorithm, data, sampler and seed, or use another "
                             "output_dir")
        if isinstance(self.store, HostStore):
            store = self.store.load(store)  # in place: a memory-mapped table stays mapped
        self.state, self.store, self.round = state, store, int(meta["round"])
        self.history = list(meta["history"])
        self.monitor.restore(meta["monitor"])
        return int(meta["chunk_size"])

    def _fingerprint(self, first_cohort) -> dict:
        """What a checkpoint's run must share with this one to be resumed by it."""
        program = chunk_size_lib.round_program_key(
            self.algorithm, self.train, self.sampler.max_size, self.state, first_cohort,
            seed=self.seed, mesh=self.mesh, pool=self.pool, store=self.store)
        population = hashlib.sha256(np.asarray(self.train.offsets).tobytes()).hexdigest()[:16]
        out = {"round_program": program, "seed": self.seed, "sampler": self.sampler.name,
               "population": f"{self.train.num_clients} clients, "
                             f"{self.train.total_examples} examples, offsets {population}"}
        if self.devices is not None:
            out["devices"] = self.devices.name()
        return out

    def _catch_signals(self) -> Callable[[], None]:
        """SIGTERM and a first Ctrl-C set a flag the round loop stops at; returns a function
        putting the old handlers back. Only the main thread may install handlers."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {}

        def handler(signum, frame):
            if self._stop is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: at once
            self._stop = signum

        for s in (signal.SIGTERM, signal.SIGINT):
            old[s] = signal.signal(s, handler)
        return lambda: [signal.signal(s, h) for s, h in old.items()] and None


def simulate(algorithm: FederatedAlgorithm, train: FederatedData, *, rounds: int,
             **kwargs) -> SimulationResult:
    """Runs `rounds` rounds of `algorithm` on `train` (with `resume=True`, up to round
    `rounds` from the newest checkpoint): `Simulation(algorithm, train, **kwargs)` then
    `run`. See `Simulation` for the arguments.

    Example:
      >>> result = simulate(algo, train, rounds=100, cohort_size=10)   # doctest: +SKIP
    """
    rounds = check_integer("rounds", rounds, 0)
    sim = Simulation(algorithm, train, **kwargs)
    return sim.run(max(rounds - sim.round, 0))


def evaluation_record(evaluator: Evaluator, extra_evaluators: dict, params, store,
                      round_num: int) -> dict:
    """A record's evaluation: the global model per client and, where clients have their own
    models (personal or fine-tuned), theirs; the pooled metrics on each `extra_evaluators`
    set. Shared by `Simulation` and `fs.sweep`, so their records agree."""
    out = {name: {k: v["weighted_mean"] for k, v in ev(params).summary.items()}
           for name, ev in extra_evaluators.items()}
    ev = evaluator(params, personalized=False, round_num=round_num)
    out.update({"eval": ev.summary,
                "eval_clients": {k: v.tolist() for k, v in ev.clients.items()}})
    own = None
    if evaluator.personalized:
        own = evaluator(params, store, round_num=round_num)
        out["eval_personal"] = own.summary
        out["eval_personal_clients"] = {k: v.tolist() for k, v in own.clients.items()}
    if "accuracy" in ev.clients:
        out["eval_fairness"] = fairness(ev.clients["accuracy"], ev.clients["num_examples"])
        if own is not None:
            out["eval_personal_fairness"] = fairness(
                own.clients["accuracy"], own.clients["num_examples"],
                baseline=ev.clients["accuracy"])
    return out


def _check_secure_aggregation(record: dict) -> None:
    """Secure aggregation's failures stop the run loudly (`fs.secagg`): a round whose sum
    could not be unmasked or whose distributed noise came from too few clients; and warns of
    one whose sum may have wrapped around the ring."""
    server = record["server"]
    if server.get("secagg_unrecoverable", 0) > 0:
        raise RuntimeError(
            f"round {record['round']}: secure aggregation could not unmask the sum: "
            f"{int(server['secagg_unrecoverable'])} client(s) kept fewer than the threshold of "
            "surviving neighbours (the round's aggregate was zero); lower the dropout or the "
            "threshold, or raise the degree")
    if server.get("dp_noise_shortfall", 0) > 0:
        raise RuntimeError(
            f"round {record['round']}: distributed DP's noise was calibrated for more "
            f"clients than survived ({int(server['dp_noise_shortfall'])} short): the round "
            "is not covered by the guarantee; lower min_clients or the dropout")
    # The default scale keeps the bound just under 1; its float32 sum over the cohort can read
    # up to 2^-12 above (cohorts up to 4,096), which is not an overflow.
    if server.get("secagg_overflow_bound", 0) > 1 + 2.0 ** -12:
        warnings.warn(f"round {record['round']}: the secure sum may have wrapped around its "
                      f"ring (overflow bound {server['secagg_overflow_bound']:.3g} > 1); "
                      "lower the scale or raise the bits", stacklevel=3)


def _scan_sampler(train, sampler, cohort_size, *, devices, target_epsilon, resident,
                  client_store) -> sampling.Sampler:
    """The on-device sampler of a run with rounds_per_call > 1, refusing what it cannot run."""
    refused = [(devices is not None, "a device model (devices=): its plans are made on the "
                                     "host"),
               (target_epsilon is not None, "target_epsilon: the run stops before a round "
                                            "past it, which a call cannot"),
               (resident is False, "resident=False: cohorts are packed from the resident "
                                   "population"),
               (client_store not in ("device", None), f"client_store={client_store!r}: a "
                                                      "host store's rows are read each round")]
    for bad, why in refused:
        if bad:
            raise ValueError(f"rounds_per_call > 1 cannot take {why}; use rounds_per_call=1")
    if sampler is None:
        if cohort_size is None:
            raise TypeError("give cohort_size (clients per round) or a sampler")
        return sampling.on_device(train.num_clients, check_integer("cohort_size",
                                                                   cohort_size, 1))
    if not isinstance(sampler, sampling.Sampler) or sampler.device is None:
        name = sampler.name if isinstance(sampler, sampling.Sampler) else type(sampler).__name__
        raise ValueError(f"rounds_per_call > 1 draws each cohort inside the program: the "
                         f"sampler {name} draws on the host; give cohort_size (or "
                         "sampler=fs.sampling.on_device(N, cohort_size))")
    return sampler


def _device_sampler(devices, train, sampler, cohort_size) -> tuple[Any, int | None]:
    """The sampler a device model runs with and the clients it counts a round (None: the
    sampler's draw): a model that over-selects or follows availability draws for itself."""
    if not isinstance(devices, DeviceModel):
        raise TypeError(f"devices must be a fs.devices.DeviceModel, got "
                        f"{type(devices).__name__}")
    if devices.devices.num_clients != train.num_clients:
        raise ValueError(f"devices profiles {devices.devices.num_clients} clients, the "
                         f"training population has {train.num_clients}: one profile per "
                         "client (Devices.from_fedscale deals a trace's to any population)")
    if not devices.selects:
        return sampler, None
    if sampler is not None:
        raise ValueError("a device model with over_selection > 1 or availability draws the "
                         "cohort itself (uniformly among the available clients): give "
                         "cohort_size, not a sampler")
    if cohort_size is None:
        raise TypeError("give cohort_size (the clients counted per round)")
    target = check_integer("cohort_size", cohort_size, 1)
    if target > train.num_clients:
        raise ValueError(f"cohort_size {target} is larger than the population of "
                         f"{train.num_clients} clients")
    drawn = devices.draw_size(target)
    # No participation: no accountant covers a draw that depends on the clock and the race.
    return sampling.Sampler(
        lambda seed, r: devices.select(target, seed=seed, round_num=r, clock=0.0)[0], drawn,
        f"devices(draw {drawn}, count {target})"), target


def _ledger(algorithm, sampler, delta, target_epsilon, accountant) -> privacy.Ledger | None:
    """The privacy ledger of a chain with a DP stage (None without one)."""
    event = getattr(algorithm.aggregator, "privacy", None)
    if event is None:
        given = [n for n, v in (("delta", delta), ("target_epsilon", target_epsilon),
                                ("accountant", accountant)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} given, but the aggregation chain has no DP "
                             "stage to account for (e.g. fs.aggregators.dp_mean)")
        return None
    if len(algorithm.passes) > 1:
        raise ValueError(f"the privacy accounting covers one aggregation per round; this "
                         f"algorithm aggregates {len(algorithm.passes)} times a round")
    return privacy.Ledger(event, sampler.participation, delta=delta, accountant=accountant,
                          target_epsilon=target_epsilon, sampler_name=sampler.name)


def step_efficiency(num_steps: np.ndarray, chunk_size: int) -> float:
    """Useful local steps over executed ones: a vmapped chunk runs to its longest client."""
    steps = np.asarray(num_steps, np.int64).reshape(-1, chunk_size)
    executed = int(steps.max(axis=1).sum()) * chunk_size
    return float(steps.sum() / executed) if executed else 1.0


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


def _round_record(r: int, metrics, data: FederatedData, wall_time: float,
                  chunk_size: int, plan: RoundPlan | None = None) -> dict:
    m = _to_host(metrics)
    ids = m.clients["client_ids"]
    real = ids < data.num_clients
    clients = {k: v[real].tolist() for k, v in m.clients.items() if k != "client_ids"}
    clients["client_id"] = data.client_ids[ids[real]].tolist()
    if plan is not None:  # the plan is in sample order, the cohort in packing order
        by_id = np.argsort(plan.ids, kind="stable")
        at = by_id[np.searchsorted(plan.ids[by_id], ids[real])]
        clients["client_time"] = plan.client_time[at].tolist()
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


def _link_bits(algorithm, params) -> dict:
    """Bits per client each way: the upload as the aggregator chain encodes the trained
    leaves (`Aggregator.upload_bits`; 32 bits an entry unencoded), the broadcast as the
    params at their dtypes."""
    leaves = jax.tree.leaves(params)
    sent = (sum(int(np.size(x)) for x in leaves) if algorithm.trained is None
            else algorithm.trained.params)
    return {"uplink_bits": compression.upload_bits(algorithm.aggregator, sent),
            "downlink_bits": sum(int(np.size(x)) * np.dtype(x.dtype).itemsize * 8
                                 for x in leaves)}


# Keys a record has of its own, which an `eval_extra` name must not shadow.
_RECORD_KEYS = frozenset({"round", "wall_time", "train_loss", "num_included", "num_excluded",
                          "excluded_clients", "update_norm", "params_norm", "outlier_clients",
                          "chunk_size", "step_efficiency", "server", "clients", "epsilon",
                          "eval", "eval_clients", "eval_personal", "eval_personal_clients",
                          "eval_fairness", "eval_personal_fairness", "uplink_bits",
                          "downlink_bits", "virtual_time", "round_time", "num_sampled",
                          "num_dropped", "num_late", "num_partial", "num_unselected",
                          "num_available"})


def _postfix(record: dict) -> dict:
    postfix = {"loss": f"{record['train_loss']:.4f}"}
    if "epsilon" in record:
        postfix["eps"] = f"{record['epsilon']:.3g}"
    if "eval" in record and "accuracy" in record["eval"]:
        postfix["acc"] = f"{record['eval']['accuracy']['weighted_mean']:.3f}"
    if "eval_personal" in record and "accuracy" in record["eval_personal"]:
        postfix["own"] = f"{record['eval_personal']['accuracy']['weighted_mean']:.3f}"
    return postfix
