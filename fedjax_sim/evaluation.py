"""Evaluation: per-client metrics, computed for many clients in one compiled program, and their
distribution across clients.

FL's promise is a model that works for each user, so the per-client distribution (percentiles,
the worst decile) matters as much as the pooled mean. Evaluation reuses the client engine: an
evaluation "client update" accumulates masked metric sums over the client's batches.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from fedjax_sim.checks import (
    check_data,
    check_eval_clients,
    check_features,
    check_integer,
    check_model,
    check_not_empty,
    check_params,
)
from fedjax_sim.data.cohort import Batching
from fedjax_sim.data.federated import FederatedData, check_labels
from fedjax_sim.engine import ClientResult, ClientUpdate, Engine, replicate, run_clients
from fedjax_sim.models.core import Model
from fedjax_sim.rounds import Packer

QUANTILES = (10, 50, 90)
SUMMARY_KEYS = ("weighted_mean", "mean", *(f"p{q}" for q in QUANTILES), "worst10")


class Evaluation(NamedTuple):
    """Per-client metrics and their distribution.

    Attributes:
      clients: per-client arrays, in population order: "client_id" (str), "num_examples",
        and every model metric.
      summary: {metric: {"weighted_mean", "mean", "p10", "p50", "p90", "worst10"}}, where
        weighted_mean weighs clients by example count (the pooled mean), mean weighs clients
        equally, and worst10 is the mean over the worst decile of clients (lowest accuracy,
        highest loss).
    """

    clients: dict[str, np.ndarray]
    summary: dict[str, dict[str, float]]


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


def summarize(values: np.ndarray, weights: np.ndarray, lower_better: bool) -> dict[str, float]:
    """The distribution of one per-client metric over clients."""
    values = np.asarray(values, np.float64)
    weights = np.asarray(weights, np.float64)
    out = {
        "weighted_mean": float(np.sum(values * weights) / np.sum(weights)),
        "mean": float(np.mean(values)),
    }
    for q in QUANTILES:
        out[f"p{q}"] = float(np.percentile(values, q))
    ranked = np.sort(values)[::-1] if lower_better else np.sort(values)
    out["worst10"] = float(np.mean(ranked[: max(1, len(values) // 10)]))
    return out


def as_ratio(value) -> tuple[jax.Array, jax.Array]:
    """A per-example metric as (numerator, denominator): a plain value counts 1 per example."""
    if isinstance(value, tuple | list):
        num, den = value
        return num, den
    return value, jnp.ones_like(value)


def format_summary(summary: dict[str, float]) -> str:
    """One line for a metric's distribution over clients, e.g. for a progress log."""
    return "  ".join(f"{k} {summary[k]:.3f}" for k in SUMMARY_KEYS if k in summary)


def metric_update(model: Model, metric_names: Sequence[str]) -> ClientUpdate:
    """A client update that sums the model's per-example metrics (numerators and denominators)
    over the client's examples."""

    def init(params, ctx):
        zero = jnp.zeros((), jnp.result_type(float))
        return params, {name: (zero, zero) for name in metric_names}

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


@functools.partial(jax.jit, static_argnames=("update", "engine"))
def _run(update, params, inputs, *, engine):
    # Forward only, no aggregation: the per-client sums are the result.
    return run_clients(update, inputs.cohort, inputs.pool, params, jax.random.key(0),
                       engine=engine).metrics


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
    """

    def __init__(self, model: Model, data: FederatedData, *, batch_size: int = 64,
                 num_clients: int | None = None, chunk_size: int | None = None,
                 engine: Engine | None = None, seed: int = 0, name: str = "data"):
        model = check_model(model)
        data = check_not_empty(check_data(name, data), name)
        check_features(data, name)
        if model.label is not None:
            check_labels(data, *model.label)
        n = (data.num_clients if num_clients is None
             else check_eval_clients(num_clients, data, "num_clients"))
        batch_size = check_integer("batch_size", batch_size, 1)
        seed = check_integer("seed", seed, 0)
        self.model, self.data = model, data
        self.indices = (np.arange(n) if n == data.num_clients else
                        np.sort(np.random.default_rng(seed).choice(data.num_clients, n,
                                                                   replace=False)))
        engine = engine or Engine()
        k = chunk_size or default_eval_chunk(n, engine)
        self.engine = Engine(chunk_size=k, mesh=engine.mesh)
        packer = Packer(data, [Batching(batch_size=batch_size, shuffle=False)], n, self.engine,
                        pool=replicate(data.features, self.engine))
        cohorts, rows = packer.pack(self.indices, seed=0, round_num=0)
        self.inputs = packer.place(cohorts, rows)
        # Clients come back sorted by size: remember the order to report them by population index.
        ids = np.asarray(cohorts[-1].client_ids)[:n]
        self._by_position = np.argsort(ids, kind="stable")
        self.positions = ids[self._by_position]
        self.num_examples = np.asarray(cohorts[-1].num_examples)[:n][self._by_position]
        self._names: list[str] | None = None
        self._update: ClientUpdate | None = None

    def check(self, params: Any) -> None:
        """Checks `params` and the model's metrics on this data (once: this also builds the
        program's client update, and a new one would compile a new program)."""
        if self._update is None:
            check_params(self.model, params)
            self._names = metric_names(self.model, self.data, params)
            self._update = metric_update(self.model, tuple(self._names))

    def __call__(self, params: Any) -> Evaluation:
        self.check(params)
        sums = _run(self._update, replicate(params, self.engine), self.inputs,
                    engine=self.engine)
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
            summary[k] = (summarize(clients[k][has], den[has], lower_is_better(k)) if has.any()
                          else dict.fromkeys(SUMMARY_KEYS, float("nan")))
        return Evaluation(clients, summary)


def default_eval_chunk(num_clients: int, engine: Engine) -> int:
    """Evaluation is forward-only: vmap wide on accelerators, narrower on the CPU."""
    per_device = -(-num_clients // engine.num_devices)
    cap = 16 if jax.default_backend() == "cpu" else 256
    return max(1, min(per_device, cap))


def evaluate(model: Model, params: Any, data: FederatedData, *, batch_size: int = 64,
             num_clients: int | None = None, seed: int = 0) -> Evaluation:
    """Per-client metrics of `params` on the clients of `data` and their distribution.

    Example:
      >>> ev = evaluate(model, params, test)                 # doctest: +SKIP
      >>> ev.summary["accuracy"]["p10"], ev.clients["accuracy"][:5]   # doctest: +SKIP
    """
    return Evaluator(model, data, batch_size=batch_size, num_clients=num_clients, seed=seed)(params)


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
