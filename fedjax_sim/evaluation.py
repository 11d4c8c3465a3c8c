"""Evaluation: per-client metrics, computed for many clients in one compiled program, and their
distribution across clients.

FL's promise is a model that works for each user, so the per-client distribution (percentiles,
the worst decile) matters as much as the pooled mean. Evaluation reuses the client engine: an
evaluation "client update" accumulates masked metric sums over the client's batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from fedjax_sim import client_store
from fedjax_sim.algorithms.base import RoundInputs
from fedjax_sim.checks import (
    check_bool,
    check_data,
    check_eval_clients,
    check_features,
    check_integer,
    check_model,
    check_not_empty,
    check_optimizer,
    check_params,
)
from fedjax_sim.data.cohort import Batching, CohortShape, pack_cohort, resident_order
from fedjax_sim.data.federated import FederatedData, check_labels
from fedjax_sim.engine import (
    ClientResult,
    ClientUpdate,
    Engine,
    place_cohort,
    place_rows,
    replicate,
    run_clients,
)
from fedjax_sim.models.core import Model
from fedjax_sim.rounds import Packer

QUANTILES = (10, 50, 90)
SUMMARY_KEYS = ("weighted_mean", "mean", *(f"p{q}" for q in QUANTILES), "worst10")


class Evaluation(NamedTuple):
    """Per-client metrics and their distribution.

    Attributes:
      clients: per-client arrays, in population order: "client_id" (str), "num_examples",
        and every model metric.
      summary: {metric: {"weighted_mean", "mean", "mean_ci95", "std", "p10", "p50", "p90",
        "worst10"}}, where weighted_mean weighs clients by example count (the pooled mean),
        mean weighs clients equally, mean_ci95 is the half-width of a 95% confidence
        interval for the population's client mean from this sample of its clients (0 when
        every client was evaluated), std the spread between clients, and worst10 the mean
        over the worst decile of clients (lowest accuracy, highest loss).
    """

    clients: dict[str, np.ndarray]
    summary: dict[str, dict[str, float]]


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


def summarize(values: np.ndarray, weights: np.ndarray, lower_better: bool,
              population: int | None = None) -> dict[str, float]:
    """The distribution of one per-client metric over clients; with `population` (the
    number of clients the evaluated ones were sampled from), the confidence interval of its
    client mean."""
    values = np.asarray(values, np.float64)
    weights = np.asarray(weights, np.float64)
    n = len(values)
    out = {
        "weighted_mean": float(np.sum(values * weights) / np.sum(weights)),
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if n > 1 else 0.0,
    }
    if population is not None:
        out["mean_ci95"] = mean_ci95(values, population)
    for q in QUANTILES:
        out[f"p{q}"] = float(np.percentile(values, q))
    ranked = np.sort(values)[::-1] if lower_better else np.sort(values)
    out["worst10"] = float(np.mean(ranked[: max(1, len(values) // 10)]))
    return out


def mean_ci95(values: np.ndarray, population: int) -> float:
    """Half-width of the 95% confidence interval for the mean over `population` clients from
    a uniform sample without replacement of `values`: Student's t times the standard error,
    with the finite-population correction (0 for the whole population)."""
    from scipy import stats

    n = len(values)
    if n >= population:
        return 0.0
    if n < 2:
        return float("inf")
    correction = np.sqrt((population - n) / (population - 1))
    return float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / np.sqrt(n) * correction)


def fairness(values: np.ndarray, num_examples: np.ndarray, *,
             baseline: np.ndarray | None = None, bins: int = 4) -> dict[str, Any]:
    """Fairness figures of one per-client metric (higher is better, e.g. accuracy): the
    spread between clients (std, p90 - p10), the mean by client size (`bins` quantile bins
    of the example count, smallest first), and with `baseline` (the same clients' values
    under another model, e.g. the global one) the share of clients it helps and hurts."""
    values = np.asarray(values, np.float64)
    sizes = np.asarray(num_examples)
    edges = np.unique(np.quantile(sizes, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, sizes, side="right") - 1, 0, len(edges) - 2)
    out: dict[str, Any] = {
        "std": float(np.std(values)),
        "p90_minus_p10": float(np.percentile(values, 90) - np.percentile(values, 10)),
        "by_size": [{"min_examples": int(sizes[which == b].min()),
                     "max_examples": int(sizes[which == b].max()),
                     "clients": int(np.sum(which == b)),
                     "mean": float(values[which == b].mean())}
                    for b in range(len(edges) - 1) if np.any(which == b)],
    }
    if baseline is not None:
        gain = values - np.asarray(baseline, np.float64)
        out["helped"] = float(np.mean(gain > 0))
        out["hurt"] = float(np.mean(gain < 0))
        out["mean_gain"] = float(gain.mean())
    return out


def as_ratio(value) -> tuple[jax.Array, jax.Array]:
    """A per-example metric as (numerator, denominator): a plain value counts 1 per example."""
    if isinstance(value, tuple | list):
        num, den = value
        return num, den
    return value, jnp.ones_like(value)


def format_summary(summary: dict[str, float]) -> str:
    """One line for a metric's distribution over clients, e.g. for a progress log."""
    parts = [f"{k} {summary[k]:.3f}" for k in SUMMARY_KEYS if k in summary]
    if summary.get("mean_ci95", 0) > 0:  # a sample of the clients: the mean's uncertainty
        parts[1] += f"±{summary['mean_ci95']:.3f}"
    return "  ".join(parts)


def metric_update(model: Model, metric_names: Sequence[str], *,
                  own: Callable[[Any, Any], Any] | None = None) -> ClientUpdate:
    """A client update that sums the model's per-example metrics (numerators and denominators)
    over the client's examples, at the broadcast params or at the client's own model
    `own(params, ctx.state)`."""

    def init(params, ctx):
        zero = jnp.zeros((), jnp.result_type(float))
        mine = params if own is None else own(params, ctx.state)
        return mine, {name: (zero, zero) for name in metric_names}

    def step(state, batch, mask):
        params, sums = state
        per_example = model.metrics(params, batch)
        new = {}
        for k in metric_names:
            num, den = as_ratio(per_example[k])
            new[k] = (sums[k][0] + jnp.sum(jnp.where(mask, num, 0.0)),
                      sums[k][1] + jnp.sum(jnp.where(mask, den, 0.0)))
        return params, new

    def finalize(params, state, ctx):
        return ClientResult(metrics=state[1])

    return ClientUpdate(init, step, finalize)


class FineTune(NamedTuple):
    """Personalization by fine-tuning: before it is evaluated on its test split, each
    evaluation client takes `steps` local steps of `optimizer` on its own training split
    (batches of `batch_size`, epochs back to back, reshuffled each epoch), from the global
    params or from the algorithm's personal model. `steps=0` is the global evaluation."""

    optimizer: optax.GradientTransformation
    steps: int
    batch_size: int = 10


def check_fine_tune(value: Any) -> FineTune:
    if not isinstance(value, FineTune):
        raise TypeError(f"fine_tune must be fs.evaluation.FineTune(optimizer, steps), got "
                        f"{type(value).__name__} {value!r}"[:300])
    if isinstance(value.steps, bool) or not isinstance(value.steps, int) or value.steps < 0:
        raise ValueError(f"fine_tune.steps (local steps before evaluation) must be an integer "
                         f">= 0, got {value.steps!r}")
    check_integer("fine_tune.batch_size", value.batch_size, 1)
    check_optimizer(value.optimizer, "fine_tune.optimizer")
    return value


def tuning_update(model: Model, fine_tune: FineTune,
                  personal: Callable[[Any, Any], Any] | None) -> ClientUpdate:
    """Fine-tuning as a client update whose new state is the client's tuned params."""
    from fedjax_sim.algorithms.local import Broadcast, local_training, train_metrics

    init_local, step = local_training(model, fine_tune.optimizer)

    def init(params, ctx):
        start = params if personal is None else personal(params, ctx.state)
        return init_local(Broadcast(start, jnp.int32(0)), ctx)

    def finalize(params, local, ctx):
        return ClientResult(state=local.params, metrics=train_metrics(local))

    return ClientUpdate(init, step, finalize)


@functools.partial(jax.jit, static_argnames=("update", "engine"))
def _run(update, params, inputs, client_states=(), *, engine):
    # Forward only, no aggregation: the per-client sums are the result.
    return run_clients(update, inputs.cohort, inputs.pool, params, jax.random.key(0),
                       engine=engine, client_states=client_states).metrics


@functools.partial(jax.jit, static_argnames=("update", "engine"))
def _tune(update, params, inputs, client_states, key, *, engine):
    return run_clients(update, inputs.cohort, inputs.pool, params, key, engine=engine,
                       client_states=client_states).states


@jax.jit
def _gather(store, ids, initial):
    return client_store.gather(store, ids, initial)


@jax.jit
def _fill(rows, initial):
    return client_store.fill(rows, initial)


def metric_names(model: Model, data: FederatedData, params: Any) -> list[str]:
    sample = {k: v[:1] for k, v in data.features.items()}
    try:
        shapes = jax.eval_shape(model.metrics, params, sample)
    except Exception as e:  # noqa: BLE001 - re-raised with the context a user needs
        raise ValueError(f"model.metrics failed on one example with features "
                         f"{ {k: v.shape for k, v in sample.items()} }: {e!r}") from e
    if "loss" not in shapes:
        raise ValueError(f"model.metrics must return a 'loss' entry, got {sorted(shapes)}")
    for k, s in shapes.items():
        parts = s if isinstance(s, tuple | list) else (s,)
        if len(parts) > 2 or any(p.shape != (1,) for p in parts):
            raise ValueError(
                f"model.metrics[{k!r}] must give one value per example (or a (numerator, "
                f"denominator) pair of them): shape (1,) for a batch of 1, got "
                f"{[p.shape for p in parts]}")
    return sorted(shapes)


class Evaluator:
    """Evaluates a model on (a sample of) the clients of `data`, reusing one compiled program.

    The data is placed on the device once. Use `evaluate` for a one-off call.

    `num_clients` evaluates a seeded sample of the clients, the same at every call or, with
    `rolling`, a fresh one for each round (each summary's "mean_ci95" then bounds the
    population's client mean).

    Personalized evaluation: with `personal` (an algorithm's `(params, client_state) ->
    params`, e.g. Ditto's personal model) each client is evaluated with its own model, its
    state read from the client store given at the call (the row of the client of the same id
    in `train`, the training population); with `fine_tune` each client first takes that many
    local steps on its own training split in `train`, from the global params or its personal
    model. Both run as engine passes over all evaluation clients at once, as does an
    algorithm's `personal_pass` (`(Batching, ClientUpdate)`, before fine-tuning): over each
    client's training split, from its store row to the state `personal` reads (clustered FL:
    a client never sampled chooses its cluster by its training loss).
    """

    def __init__(self, model: Model, data: FederatedData, *, batch_size: int = 64,
                 num_clients: int | None = None, chunk_size: int | None = None,
                 engine: Engine | None = None, seed: int = 0, name: str = "data",
                 train: FederatedData | None = None, fine_tune: FineTune | None = None,
                 personal: Callable[[Any, Any], Any] | None = None,
                 client_state: Callable[[Any], Any] | None = None, rolling: bool = False,
                 personal_pass: tuple[Batching, ClientUpdate] | None = None):
        model = check_model(model)
        data = check_not_empty(check_data(name, data), name)
        check_features(data, name)
        if model.label is not None:
            check_labels(data, *model.label)
        n = (data.num_clients if num_clients is None
             else check_eval_clients(num_clients, data, "num_clients"))
        batch_size = check_integer("batch_size", batch_size, 1)
        seed = check_integer("seed", seed, 0)
        fine_tune = None if fine_tune is None else check_fine_tune(fine_tune)
        if fine_tune is not None and fine_tune.steps == 0:
            fine_tune = None  # no step: the evaluation of the start params
        if personal is not None and client_state is None:
            raise ValueError("a personal model needs the algorithm's client_state (the state "
                             "of a client never sampled)")
        self.model, self.data, self.seed, self.num_clients = model, data, seed, n
        self.rolling = check_bool("rolling", rolling)
        self.fine_tune, self.personal, self.client_state = fine_tune, personal, client_state
        self.personal_pass = None if personal is None else personal_pass
        engine = engine or Engine()
        k = chunk_size or default_eval_chunk(n, engine)
        self.engine = Engine(chunk_size=k, mesh=engine.mesh)
        self._packer = Packer(data, [Batching(batch_size=batch_size, shuffle=False)], n,
                              self.engine, pool=replicate(data.features, self.engine))
        self.train = None
        if fine_tune is not None or personal is not None:
            self._check_train(train, n)
        self._names: list[str] | None = None
        self._updates: dict[str, ClientUpdate] = {}
        self._pack(self.sample(0), 0)

    def sample(self, round_num: int) -> np.ndarray:
        """The evaluated clients' positions: all, a fixed seeded sample, or (`rolling`) a
        fresh one for each round, from (seed, round)."""
        n, total = self.num_clients, self.data.num_clients
        if n == total:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, round_num] if self.rolling else self.seed)
        return np.sort(rng.choice(total, n, replace=False))

    def _check_train(self, train: FederatedData | None, n: int) -> None:
        if train is None:
            raise ValueError("fine-tuning and personal models need train=, the training "
                             "population holding each evaluation client's training split")
        train = check_not_empty(check_data("train", train), "train")
        check_features(train, "train")
        if self.model.label is not None:
            check_labels(train, *self.model.label)
        self.train, self._train_index = train, {c: i for i, c in
                                                enumerate(train.client_ids.tolist())}
        # The passes over the clients' training splits: the algorithm's, then fine-tuning.
        self._train_passes = {}
        if self.personal_pass is not None:
            self._train_passes["personal"] = self.personal_pass[0]
        if self.fine_tune is not None:
            ft = self.fine_tune
            # k B epochs hold k batches even for a client of one example; max_steps stops
            # at k.
            self._train_passes["tune"] = Batching(batch_size=ft.batch_size,
                                                  num_epochs=ft.steps * ft.batch_size,
                                                  max_steps=ft.steps)
        self._train_shapes = {name: CohortShape.for_population(train, b, n,
                                                               self.engine.cohort_multiple)
                              for name, b in self._train_passes.items()}
        self._train_pool = (replicate(train.features, self.engine) if self._train_passes
                            else None)

    def _pack(self, indices: np.ndarray, round_num: int) -> None:
        """Packs the evaluated clients (and their training splits for fine-tuning)."""
        n = len(indices)
        cohorts, rows = self._packer.pack(indices, seed=0, round_num=0)
        self.inputs = self._packer.place(cohorts, rows)
        self.indices, self._packed_round = indices, round_num
        # Clients come back sorted by size: remember the order to report them by population
        # index.
        ids = np.asarray(cohorts[-1].client_ids)[:n]
        self._by_position = np.argsort(ids, kind="stable")
        self.positions = ids[self._by_position]
        self.num_examples = np.asarray(cohorts[-1].num_examples)[:n][self._by_position]
        if self.train is not None:
            self._own_clients(self.data.client_ids[ids], len(cohorts[-1].client_ids),
                              round_num)

    def _own_clients(self, ids: np.ndarray, size: int, round_num: int) -> None:
        """The evaluation clients' positions in the training population, in cohort order (for
        their store rows), and their training splits packed for fine-tuning."""
        missing = [c for c in ids.tolist() if c not in self._train_index]
        if missing:
            raise ValueError(f"{len(missing)} evaluation client(s) have no training split in "
                             f"train (e.g. {missing[:3]}): fine-tuning and personal models "
                             "need each client's own training data and state")
        order = np.array([self._train_index[c] for c in ids.tolist()], np.int64)
        padding = self.train.num_clients + np.arange(size - len(order))
        self._train_ids = place_rows(np.concatenate([order, padding]).astype(np.int32),
                                     self.engine)
        self._train_inputs = {}
        for name, batching in self._train_passes.items():
            cohort, rows = pack_cohort(self.train, order, batching, self._train_shapes[name],
                                       seed=self.seed, round_num=round_num, sort=False)
            self._train_inputs[name] = RoundInputs(
                (place_cohort(resident_order(cohort, rows), self.engine),), self._train_pool,
                self.train.num_clients)

    def check(self, params: Any) -> None:
        """Checks `params` and the model's metrics on this data (once: this also builds the
        programs' client updates, and new ones would compile new programs)."""
        if self._names is None:
            check_params(self.model, params)
            self._names = metric_names(self.model, self.data, params)
            names = tuple(self._names)
            self._updates["global"] = metric_update(self.model, names)
            if self.fine_tune is not None:
                self._updates["tune"] = tuning_update(self.model, self.fine_tune,
                                                      self.personal)
                self._updates["own"] = metric_update(self.model, names, own=_own_params)
            elif self.personal is not None:
                self._updates["own"] = metric_update(self.model, names, own=self.personal)

    @property
    def personalized(self) -> bool:
        """Whether each client is evaluated with its own model (personal or fine-tuned)."""
        return self.fine_tune is not None or self.personal is not None

    def __call__(self, params: Any, store: Any = None, *, personalized: bool | None = None,
                 round_num: int = 0) -> Evaluation:
        """Per-client metrics of the global `params`, or (by default when the evaluator was
        built for it) of each client's own model: `store` is the client store (a
        `client_store.ClientStore` or `HostStore`) when the algorithm has personal state.
        A rolling evaluator evaluates `round_num`'s sample (the same program, repacked)."""
        self.check(params)
        if self.rolling and round_num != self._packed_round:
            self._pack(self.sample(round_num), round_num)
        own = self.personalized if personalized is None else personalized
        replicated = replicate(params, self.engine)
        states = ()
        key = jax.random.fold_in(jax.random.key(self.seed), 0)  # as a round's clients
        if own and self.personal is not None:
            states = self._store_rows(params, store)
        if own and self.personal_pass is not None:
            states = _tune(self.personal_pass[1], replicated, self._train_inputs["personal"],
                           states, key, engine=self.engine)
        if own and self.fine_tune is not None:
            states = _tune(self._updates["tune"], replicated, self._train_inputs["tune"],
                           states, key, engine=self.engine)
        update = self._updates["own" if own else "global"]
        sums = _run(update, replicated, self.inputs, states, engine=self.engine)
        if not all(x.is_fully_addressable for x in jax.tree.leaves(sums)):
            # Multi-process: the per-client sums are split over every process's devices.
            sums = multihost_utils.process_allgather(sums, tiled=True)
        n = len(self.positions)
        clients = {"client_id": self.data.client_ids[self.positions],
                   "num_examples": self.num_examples}
        summary = {}
        for k in self._names:
            num, den = (np.asarray(x, np.float64)[:n][self._by_position] for x in sums[k])
            # A client with nothing to average over (no valid token, say) has no value.
            clients[k] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
            # Weighted by the metric's own denominator (examples, or e.g. valid tokens): the
            # weighted mean is then the pooled value.
            has = den > 0
            summary[k] = (summarize(clients[k][has], den[has], lower_is_better(k),
                                    self.data.num_clients) if has.any()
                          else dict.fromkeys(SUMMARY_KEYS + ("std", "mean_ci95"),
                                             float("nan")))
        return Evaluation(clients, summary)

    def _store_rows(self, params: Any, store: Any) -> Any:
        """The evaluation clients' client-store rows in cohort order (a never-sampled client's
        initial state)."""
        if store is None:
            raise ValueError("this evaluator evaluates each client's personal model: pass "
                             "the client store (Simulation.store)")
        initial = self.client_state(params)
        if isinstance(store, client_store.HostStore):
            ids = np.asarray(jax.device_get(self._train_ids))
            rows = store.rows(ids)
            placed = client_store.CohortRows(place_rows(rows.rows, self.engine),
                                             place_rows(rows.known, self.engine))
            return _fill(placed, initial)
        return _gather(store, self._train_ids, initial)


def _own_params(params, state):
    """The client's own params: its state (the fine-tuned params)."""
    return state


def default_eval_chunk(num_clients: int, engine: Engine) -> int:
    """Evaluation is forward-only: vmap wide on accelerators, narrower on the CPU."""
    per_device = -(-num_clients // engine.num_devices)
    cap = 16 if jax.default_backend() == "cpu" else 256
    return max(1, min(per_device, cap))


def evaluate(model: Model, params: Any, data: FederatedData, *, batch_size: int = 64,
             num_clients: int | None = None, seed: int = 0, train: FederatedData | None = None,
             fine_tune: FineTune | None = None) -> Evaluation:
    """Per-client metrics of `params` on the clients of `data` and their distribution; with
    `fine_tune` (and `train`), of each client's model fine-tuned on its training split.

    Example:
      >>> ev = evaluate(model, params, test)                 # doctest: +SKIP
      >>> ev.summary["accuracy"]["p10"], ev.clients["accuracy"][:5]   # doctest: +SKIP
      >>> tuned = evaluate(model, params, test, train=train,
      ...                  fine_tune=FineTune(optax.sgd(0.05), steps=10))  # doctest: +SKIP
    """
    return Evaluator(model, data, batch_size=batch_size, num_clients=num_clients, seed=seed,
                     train=train, fine_tune=fine_tune)(params)


def evaluate_pooled(model: Model, params: Any, data: FederatedData, *,
                    batch_size: int = 1024) -> dict[str, float]:
    """Centralized evaluation: the mean of each metric over all examples pooled together."""
    model = check_model(model)
    data = check_not_empty(check_data("data", data), "data")
    batch_size = check_integer("batch_size", batch_size, 1)
    check_features(data, "data")
    check_params(model, params)
    if model.label is not None:
        check_labels(data, *model.label)
    names = metric_names(model, data, params)
    fn = jax.jit(lambda p, b: {k: tuple(jnp.sum(x) for x in as_ratio(v))
                               for k, v in model.metrics(p, b).items()})
    totals = {k: [0.0, 0.0] for k in names}
    for lo in range(0, data.total_examples, batch_size):
        batch = {k: jnp.asarray(v[lo:lo + batch_size]) for k, v in data.features.items()}
        for k, (num, den) in fn(params, batch).items():
            totals[k][0] += float(num)
            totals[k][1] += float(den)
    return {k: num / den if den else float("nan") for k, (num, den) in totals.items()}
