"""`FederatedAlgorithm` and the state and metrics every algorithm shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.data.cohort import Batching
from fedjax_sim.models.core import Model

# A client optimizer: an optax transformation, or a function of the (traced) round number that
# builds one, for per-round learning-rate schedules (`lambda r: optax.sgd(schedule(r))`).
ClientOptimizer = optax.GradientTransformation | Callable[[jax.Array], optax.GradientTransformation]


class ServerState(NamedTuple):
    params: Any
    opt_state: Any  # the server optimizer's state
    agg_state: Any  # the aggregator's state
    round: jax.Array  # i32[], rounds completed


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
        "finite", "client_ids".
    """

    train_loss: jax.Array
    num_included: jax.Array
    num_excluded: jax.Array
    update_norm: jax.Array
    params_norm: jax.Array
    clients: dict[str, jax.Array]


class FederatedAlgorithm(NamedTuple):
    """A federated algorithm as pure functions plus what the simulation loop needs to feed it.

    Attributes:
      init: `(params) -> ServerState`.
      round: `(state, cohort, pool, key, *, batch_size, engine) -> (state, RoundMetrics)`; pure,
        meant to be jitted with `batch_size` and `engine` static.
      model: the model trained.
      batching: how clients walk their data each round.
      client_weighting: "num_examples" or "uniform".
    """

    init: Callable[[Any], ServerState]
    round: Callable[..., tuple[ServerState, RoundMetrics]]
    model: Model
    batching: Batching
    client_weighting: str = "num_examples"


def resolve_optimizer(opt: ClientOptimizer, round_num: jax.Array) -> optax.GradientTransformation:
    if isinstance(opt, optax.GradientTransformation):
        return opt
    return opt(round_num)


def tree_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together, without overflow: f32 squares overflow past 1.8e19,
    and a diverging run's updates get there (scaled by the largest magnitude first)."""
    leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in leaves]))
    safe = jnp.where(scale > 0, scale, 1.0)
    return safe * jnp.sqrt(sum(jnp.sum(jnp.square(x / safe)) for x in leaves))
