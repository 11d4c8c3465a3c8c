"""`FederatedAlgorithm`, the state and inputs every round shares, and the bookkeeping helpers an
algorithm needs so that it does not repeat them (the server's optax step with the "no client
left, keep the state" rule, the round's metrics)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import filters
from fedjax_sim.data.cohort import Batching, Cohort
from fedjax_sim.engine import PassResult, run_clients
from fedjax_sim.models.core import Model

# A client optimizer: an optax transformation, or a function of the (traced) round number that
# builds one, for per-round learning-rate schedules (`lambda r: optax.sgd(schedule(r))`).
ClientOptimizer = optax.GradientTransformation | Callable[[jax.Array], optax.GradientTransformation]


class ServerState(NamedTuple):
    """The server's state: everything a round reads and writes but the client store.

    Attributes:
      params: the model's params.
      opt_state: the server optimizer's state.
      agg_state: the aggregator's state.
      round: i32[], rounds completed (the number of the next round).
      key: the run's PRNG key; round r draws from `fold_in(key, r)` (`round_key`).
      extra: algorithm-specific server state (SCAFFOLD's control variate), `()` if none.
      hparams: traced hyperparameters: under "client", the client optimizer's, by name, when
        it is built with `optax.inject_hyperparams` (every client's optimizer starts from
        these values); beside it the algorithm's own (FedProx's "mu"). A round vmapped over
        states with other values runs those runs side by side (the server optimizer's live
        in `opt_state` the same way). `with_hparams` sets them.
    """

    params: Any
    opt_state: Any
    agg_state: Any
    round: jax.Array
    key: jax.Array
    extra: Any = ()
    hparams: dict = {}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["cohorts", "pool"],
                   meta_fields=["num_clients"])
@dataclasses.dataclass(frozen=True)
class RoundInputs:
    """A round's device inputs: one `Cohort` per pass (the same clients, in the same order),
    the pool of examples their `order`s index (the resident population, or the round's rows
    gathered on the host), and the population's size (static)."""

    cohorts: tuple[Cohort, ...]
    pool: dict[str, jax.Array]
    num_clients: int

    @property
    def cohort(self) -> Cohort:
        """The last pass's cohort: the local training's."""
        return self.cohorts[-1]


class RoundMetrics(NamedTuple):
    """What one round reports.

    Attributes:
      train_loss: f32[], the example-weighted mean training loss of the included clients;
        NaN when no client was included.
      num_included: i32[], clients whose update entered the aggregate.
      num_excluded: i32[], clients dropped because their update was not finite.
      update_norm: f32[], the L2 norm of the update the server applied to its params.
      params_norm: f32[], the L2 norm of the server params after the round.
      clients: per-client arrays [C] (padding clients included; `client_ids >= num_clients`):
        "train_loss", "num_examples", "num_steps", "update_norm" (of the client's output),
        "finite", "client_ids", and whatever else the algorithm or aggregator reports.
      server: round-level scalars of the aggregator and the algorithm (e.g. "weight_sum").
    """

    train_loss: jax.Array
    num_included: jax.Array
    num_excluded: jax.Array
    update_norm: jax.Array
    params_norm: jax.Array
    clients: dict[str, jax.Array]
    server: dict[str, jax.Array]


class FederatedAlgorithm(NamedTuple):
    """A federated algorithm as pure functions plus what the simulation loop needs to feed it.

    Attributes:
      init: `(params, key) -> ServerState`.
      round: `(state, inputs, client_states, *, engine) -> (state, client_states,
        RoundMetrics)`; pure, jitted with `engine` static. `client_states` are the cohort's
        rows of the client store `[C, ...]` (`()` when stateless), in cohort order.
      model: the model trained.
      passes: one `Batching` per pass of the engine in a round (Mime: a full-batch gradient
        pass, then local training); the last is the local training.
      client_state: `(params) -> state` of one client not yet sampled (evaluated on the
        current server params when it is first sampled), or None for a stateless algorithm.
      id_features: `((feature, number of ids), ...)` the algorithm itself reads from the
        data (agnostic FedAvg's domain id), checked like labels before anything compiles.
      aggregator: its `fs.aggregators` chain, where it takes one (the simulation reads the
        chain's privacy from it).
      personal: `(server params, client state) -> params` of the client's own model, for a
        personalization algorithm (Ditto's personal model, FedRep's body with its head);
        evaluation then reports each client's own model beside the global one. None: the
        server's params are every client's model.
      trained: for a partial model (`fedopt(trainable=...)`), the size of what each client
        trains and uploads (`filters.Trained`: parameters and bytes); None when every leaf
        trains.
      personal_pass: `(Batching, ClientUpdate)`, an engine pass over each evaluated client's
        training split that turns its store row (`ctx.state`; the broadcast is the server
        params) into the state `personal` reads (clustered FL: a client never sampled
        chooses its cluster by its training loss); None: the row as stored.
      check_data: `(train) -> None`, raising on a training population the algorithm cannot
        run on (more clusters than clients), before anything compiles; None: none.
    """

    init: Callable[[Any, jax.Array], ServerState]
    round: Callable[..., tuple[ServerState, Any, RoundMetrics]]
    model: Model
    passes: tuple[Batching, ...]
    client_state: Callable[[Any], Any] | None = None
    id_features: tuple[tuple[str, int], ...] = ()
    aggregator: Any = None
    personal: Callable[[Any, Any], Any] | None = None
    trained: Any = None
    personal_pass: tuple[Batching, Any] | None = None
    check_data: Callable[[Any], None] | None = None

    @property
    def batching(self) -> Batching:
        """The local training's batching (the last pass)."""
        return self.passes[-1]


def resolve_optimizer(opt: ClientOptimizer, round_num: jax.Array) -> optax.GradientTransformation:
    if isinstance(opt, optax.GradientTransformation):
        return opt
    return opt(round_num)


def client_hparams(opt: ClientOptimizer, params) -> dict:
    """The hyperparameters `optax.inject_hyperparams` put in `opt`'s state, by name (`{}` for
    none, or for a per-round function of the round: its values are its own)."""
    if not isinstance(opt, optax.GradientTransformation):
        return {}
    found = {}
    is_injected = lambda x: isinstance(getattr(x, "hyperparams", None), dict)
    for node in jax.tree.leaves(opt.init(params), is_leaf=is_injected):
        if is_injected(node):
            found.update({k: jnp.asarray(v) for k, v in node.hyperparams.items()
                          if not callable(v)})
    return found


def injected_sgd(learning_rate: float, momentum: float = 0.0) -> optax.GradientTransformation:
    """Client SGD whose learning rate is traced
    (`ServerState.hparams["client"]["learning_rate"]`)."""
    return optax.inject_hyperparams(
        lambda learning_rate: optax.sgd(learning_rate, momentum=momentum or None))(
            learning_rate=learning_rate)


def with_hparams(state: ServerState, *, client: dict | None = None,
                 server: dict | None = None, **algorithm) -> ServerState:
    """`state` with other values for the client optimizer's injected hyperparameters, the
    server optimizer's (each built with `optax.inject_hyperparams`) and the algorithm's own,
    e.g. `with_hparams(state, client={"learning_rate": 0.03}, mu=0.1)`; a name that is not
    traced is refused."""
    def replace(values: dict, new: dict, what: str, fix: str) -> dict:
        values = dict(values)
        for name, value in new.items():
            if name not in values:
                raise KeyError(f"{what} has no traced hyperparameter {name!r} (it has "
                               f"{sorted(values)}){fix}")
            values[name] = jnp.asarray(value, jnp.result_type(values[name]))
        return values

    hparams = replace(state.hparams, algorithm, "the algorithm", "")
    if client:
        hparams["client"] = replace(state.hparams.get("client", {}), client,
                                    "the client optimizer",
                                    ": build it with optax.inject_hyperparams(...)(...)")
    opt_state = state.opt_state
    if server:
        opt_state = optax.tree_utils.tree_set(opt_state, **server)
    return state._replace(hparams=hparams, opt_state=opt_state)


def round_key(state: ServerState) -> jax.Array:
    """This round's key: clients draw from `fold_in(key, 0)`, the server from 1 on."""
    return jax.random.fold_in(state.key, state.round)


def init_state(params, key, server_optimizer, aggregator, extra=(),
               client_optimizer: ClientOptimizer | None = None,
               hparams: dict | None = None, trainable=None) -> ServerState:
    """The initial state; `hparams` are the algorithm's own traced scalars ("mu"). With a
    `trainable` mask the aggregator's state is built for the trainable leaves, which are
    all the clients send."""
    params = jax.tree.map(jnp.asarray, params)
    traced = {k: jnp.asarray(v, jnp.result_type(float)) for k, v in (hparams or {}).items()}
    injected = {} if client_optimizer is None else client_hparams(client_optimizer, params)
    if injected:
        traced["client"] = injected
    sent = params if trainable is None else filters.partition(params, trainable)[0]
    return ServerState(params, server_optimizer.init(params), aggregator.init(sent),
                       jnp.int32(0), key, extra, traced)


def included(cohort: Cohort, result: PassResult) -> jax.Array:
    """bool[C]: the real clients whose output entered the aggregate (finite, with a step)."""
    return (cohort.weights > 0) & result.metrics["finite"]


def server_step(state: ServerState, pseudo_grad, optimizer: optax.GradientTransformation,
                any_included: jax.Array) -> tuple[ServerState, Any]:
    """The server's optax step on `pseudo_grad`; with no client included there is nothing to
    learn from, so params and optimizer state stay as they were. Returns (state with the new
    params, opt state and round + 1, the updates applied)."""
    updates, opt_state = optimizer.update(pseudo_grad, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(any_included, n, o), new, old)
    updates = jax.tree.map(lambda u: jnp.where(any_included, u, jnp.zeros_like(u)), updates)
    return state._replace(params=keep(params, state.params),
                          opt_state=keep(opt_state, state.opt_state),
                          round=state.round + 1), updates


def round_metrics(cohort: Cohort, result: PassResult, state: ServerState, updates,
                  server: dict | None = None) -> RoundMetrics:
    """The round's metrics from the training pass's per-client results."""
    ok = included(cohort, result)
    n = cohort.num_examples.astype(jnp.float32) * ok
    loss = result.metrics["train_loss"]
    total = jnp.sum(jnp.where(ok, loss, 0.0) * n) / jnp.maximum(jnp.sum(n), 1.0)
    clients = dict(result.metrics, num_examples=cohort.num_examples, client_ids=cohort.client_ids)
    return RoundMetrics(
        train_loss=jnp.where(jnp.any(ok), total, jnp.nan),
        num_included=jnp.sum(ok, dtype=jnp.int32),
        num_excluded=jnp.sum((cohort.weights > 0) & ~result.metrics["finite"], dtype=jnp.int32),
        update_norm=tree_norm(updates),
        params_norm=tree_norm(state.params),
        clients=clients,
        server=dict(server or {}),
    )


def tree_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together, without overflow: f32 squares overflow past 1.8e19,
    and a diverging run's updates get there (scaled by the largest magnitude first)."""
    leaves = [jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))
              for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in leaves]))
    safe = jnp.where(scale > 0, scale, 1.0)
    return safe * jnp.sqrt(sum(jnp.sum(jnp.square(x / safe)) for x in leaves))


def delta(server_params, client_params):
    """The pseudo-gradient a client sends: `server_params - client_params`."""
    return jax.tree.map(jnp.subtract, server_params, client_params)


def run_pass(update, aggregator, state: ServerState, inputs: RoundInputs, broadcast, *,
             engine, client_states=(), pass_index: int = -1, salt: int = 0):
    """One engine pass over `inputs.cohorts[pass_index]` and the aggregator's server part:
    `(result, aggregate, agg_state, agg_metrics)`. The clients draw from
    `fold_in(round key, 2 salt)`, the aggregator's server part from `2 salt + 1`."""
    key = round_key(state)
    result = run_clients(update, inputs.cohorts[pass_index], inputs.pool, broadcast,
                         jax.random.fold_in(key, 2 * salt), engine=engine, aggregator=aggregator,
                         agg_state=state.agg_state, client_states=client_states)
    aggregate, agg_state, agg_metrics = aggregator.server(
        result.reduced, state.agg_state, jax.random.fold_in(key, 2 * salt + 1))
    return result, aggregate, agg_state, agg_metrics


def zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)
