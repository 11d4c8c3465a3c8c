"""FedBuff: buffered asynchronous aggregation (Nguyen et al. 2022), the server's update rule.

Clients train from the server version they were sent, which may be older than the server's
current one; the server aggregates every `buffer_size` (K) arrivals. Client k's
pseudo-gradient `start_params_k - client_params_k` enters scaled by its staleness weight
`s(tau_k)`, tau_k = (server version at aggregation) - (version it started from): 1/sqrt(1 +
tau) ("sqrt", the paper's) or 1 ("constant"). The aggregator chain then divides by the sum of
the client weights *without* the staleness factors, so with uniform weighting the aggregate is
the paper's `sum_k s(tau_k) delta_k / K` (Algorithm 1: stale updates shrink, they are not
renormalized), and any optax server optimizer takes it as a gradient (`server_step`).

The event loop, the version stack and the client draws are in `fedjax_sim.asynchronous`;
this module is the compiled aggregation of one buffer: the K clients trained in one engine
call, each from its own start params (a [K] index into a device-side stack of the versions
still referenced, read inside the engine's vmap so only a chunk's rows are ever gathered).

References:
  Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
import optax

from fedjax_sim import aggregators as aggregators_lib
from fedjax_sim.algorithms.base import (
    ClientOptimizer,
    RoundInputs,
    RoundMetrics,
    ServerState,
    included,
    init_state,
    round_metrics,
    run_pass,
    server_step,
)
from fedjax_sim.algorithms.fedavg import check_aggregator, optimizer_client_update
from fedjax_sim.algorithms.local import Broadcast
from fedjax_sim.checks import check_integer, check_model, check_optimizer
from fedjax_sim.data.cohort import Batching
from fedjax_sim.engine import ClientUpdate, Engine
from fedjax_sim.models.core import Model

STALENESS = ("sqrt", "constant")


class StartRows(NamedTuple):
    """Per-client rows `[C]` of one buffer's engine call (the engine's `client_states`).

    Attributes:
      slot: i32[C], the row of the version stack holding the params the client was sent.
      version: i32[C], that server version (the client optimizer's round).
      draw: i32[C], the draw that sent it: its key is the one synchronous round `draw` gives
        it (`fold_in(fold_in(fold_in(fold_in(key, draw), 0), id), 0)`), as its shuffle is.
      scale: f32[C], its staleness weight s(tau).
    """

    slot: Any
    version: Any
    draw: Any
    scale: Any


def staleness_weights(kind: str, staleness: np.ndarray) -> np.ndarray:
    """f32 s(tau) for each staleness tau >= 0: 1/sqrt(1 + tau) ("sqrt") or 1 ("constant")."""
    tau = np.asarray(staleness, np.float64)
    if kind == "sqrt":
        return (1.0 / np.sqrt(1.0 + tau)).astype(np.float32)
    return np.ones(tau.shape, np.float32)


class BufferedAlgorithm(NamedTuple):
    """An asynchronous buffered algorithm (`fedbuff`), run by `fs.asynchronous`.

    Attributes:
      init: `(params, key) -> ServerState`; `state.round` is the server version.
      aggregate: `(state, versions, rows, inputs, *, engine) -> (state, RoundMetrics)`: one
        buffer's clients trained in one engine pass, client c from
        `versions[rows.slot[c]]` (a stack `[V, ...]` of params), their scaled
        pseudo-gradients reduced by the aggregator chain and the server's optax step.
      model: the model trained.
      passes: `(Batching,)`, the local training's.
      buffer_size: K, arrivals per aggregation.
      staleness: "sqrt" or "constant".
      aggregator: the `fs.aggregators` chain.
    """

    init: Callable[[Any, jax.Array], ServerState]
    aggregate: Callable[..., tuple[ServerState, RoundMetrics]]
    model: Model
    passes: tuple[Batching, ...]
    buffer_size: int
    staleness: str
    aggregator: Any

    @property
    def batching(self) -> Batching:
        return self.passes[-1]


def from_start_version(inner: ClientUpdate, scaled: bool) -> ClientUpdate:
    """`inner` trained from the client's own start params: the broadcast carries the version
    stack as params and the run's key as `extra`, `ctx.state` the client's `StartRows` row.
    With `scaled`, the output is multiplied by the staleness weight (before the chain, so
    its mask and weighting see it)."""

    def start(bcast, ctx):
        row = ctx.state
        params = jax.tree.map(lambda v: v[row.slot], bcast.params)
        # The key synchronous round `draw` would give this client (engine.run_clients).
        key = jax.random.fold_in(jax.random.fold_in(bcast.extra, row.draw), 0)
        key = jax.random.fold_in(jax.random.fold_in(key, ctx.id), 0)
        own = Broadcast(params, row.version, (), bcast.hparams)
        return own, ctx._replace(key=key, state=())

    def init(bcast, ctx):
        return inner.init(*start(bcast, ctx))

    def finalize(bcast, local, ctx):
        own, plain = start(bcast, ctx)
        result = inner.finalize(own, local, plain)
        output = result.output
        if scaled:
            output = jax.tree.map(lambda x: x * ctx.state.scale.astype(x.dtype), output)
        return result._replace(output=output, state=())

    return ClientUpdate(init=init, step=inner.step, finalize=finalize)


def fedbuff(
    model: Model,
    client_optimizer: ClientOptimizer,
    server_optimizer: optax.GradientTransformation | None = None,
    *,
    buffer_size: int,
    staleness: Literal["sqrt", "constant"] = "sqrt",
    batch_size: int | None = 10,
    num_epochs: int = 1,
    max_steps: int | None = None,
    drop_remainder: bool = False,
    max_examples_per_client: int | None = None,
    shuffle: bool = True,
    client_weighting: Literal["num_examples", "uniform"] = "num_examples",
    aggregator: aggregators_lib.Aggregator | None = None,
) -> BufferedAlgorithm:
    """FedBuff (Nguyen et al. 2022): asynchronous clients, an aggregation every
    `buffer_size` arrivals, stale updates down-weighted.

    Run it with `fs.asynchronous.simulate_async(algorithm, train, devices, concurrency=M,
    ...)` (buffer_size <= M is checked there).

    Args:
      model: the model to train.
      client_optimizer: the clients' optax optimizer, as in `fedopt`.
      server_optimizer: applied to each buffer's aggregate; default `optax.sgd(1.0)`.
      buffer_size: K, the arrivals each aggregation takes.
      staleness: "sqrt" (s(tau) = 1/sqrt(1 + tau), the paper's) or "constant" (s = 1).
      batch_size: how each client walks its data, as in `fedopt`.
      num_epochs: as in `fedopt`.
      max_steps: as in `fedopt`.
      drop_remainder: as in `fedopt`.
      max_examples_per_client: as in `fedopt`.
      shuffle: as in `fedopt`.
      client_weighting: "num_examples" (FedAvg's weighted mean, the default, so K = M with
        equal client times is FedAvg) or "uniform" (the paper's `sum s(tau) delta / K`).
      aggregator: an `fs.aggregators` chain; default `aggregators.default(client_weighting)`.

    Example:
      >>> import optax, fedjax_sim as fs
      >>> algo = fs.algorithms.fedbuff(fs.models.logistic_regression(60, 10), optax.sgd(0.1),
      ...                              buffer_size=10)
    """
    check_model(model)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    check_optimizer(client_optimizer, "client_optimizer", allow_schedule=True)
    check_optimizer(server_optimizer, "server_optimizer")
    buffer_size = check_integer("buffer_size", buffer_size, 1)
    if staleness not in STALENESS:
        raise ValueError(f"staleness must be one of {STALENESS} (s(tau) = 1/sqrt(1 + tau) or "
                         f"1), got {staleness!r}")
    aggregator = check_aggregator(aggregator, client_weighting)
    # A constant weight is exactly 1: nothing to multiply, the program is FedAvg's.
    update = from_start_version(optimizer_client_update(model, client_optimizer),
                                scaled=staleness != "constant")

    def init(params, key):
        return init_state(params, key, server_optimizer, aggregator,
                          client_optimizer=client_optimizer)

    def aggregate(state: ServerState, versions, rows: StartRows, inputs: RoundInputs, *,
                  engine: Engine):
        bcast = Broadcast(versions, state.round, state.key, state.hparams)
        result, mean_delta, agg_state, agg_metrics = run_pass(
            update, aggregator, state, inputs, bcast, engine=engine, client_states=rows)
        ok = included(inputs.cohort, result)
        state, updates = server_step(state, mean_delta, server_optimizer, ok.any())
        metrics = round_metrics(inputs.cohort, result, state, updates, agg_metrics)
        return state._replace(agg_state=agg_state), metrics

    passes = (Batching(batch_size, num_epochs, max_steps, drop_remainder,
                       max_examples_per_client, shuffle),)
    return BufferedAlgorithm(init=init, aggregate=aggregate, model=model, passes=passes,
                             buffer_size=buffer_size, staleness=staleness,
                             aggregator=aggregator)
