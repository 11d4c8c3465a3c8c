"""Local training on one client: optax steps on the masked mean batch loss (or DP-SGD's noised
sum of clipped per-example gradients, `dp_sgd`), from the params the server broadcast, with the
gradient corrections the FL literature adds (FedProx's proximal term, SCAFFOLD's and FedDyn's
linear terms), on the whole model or on the part a filter selects (`fs.filters`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import filters
from fedjax_sim.algorithms.base import ClientOptimizer, resolve_optimizer
from fedjax_sim.algorithms.dp_sgd import ExampleDP, private_gradient
from fedjax_sim.engine import ClientContext
from fedjax_sim.models.core import Model


class Broadcast(NamedTuple):
    """What the server sends every client: its params, the round number, whatever else the
    algorithm needs (SCAFFOLD's control variate, `()` if nothing), and the client optimizer's
    traced hyperparameters (`ServerState.hparams`)."""

    params: Any
    round: jax.Array
    extra: Any = ()
    hparams: dict = {}

    @classmethod
    def of(cls, state, extra=()) -> Broadcast:
        return cls(state.params, state.round, extra, state.hparams)


def split_trainable(tree, trainable: filters.Filter | None) -> tuple[Any, Any]:
    """`(trainable part, frozen part)` of a params-shaped tree (`filters.partition`);
    `(tree, ())` when every leaf trains."""
    if trainable is None:
        return tree, ()
    return filters.partition(tree, filters.mask(trainable, tree))


def personal_broadcast(broadcast: Broadcast, params, shared: bool) -> Broadcast:
    """What a client's personal model trains from (Ditto, APFL): its own `params`, and the
    client optimizer's traced hyperparameters only when the personal optimizer is the client
    optimizer itself (`shared`); another optimizer keeps its own values."""
    hparams = {"client": broadcast.hparams["client"]} if (
        shared and "client" in broadcast.hparams) else {}
    return Broadcast(params, broadcast.round, (), hparams)


class LocalState(NamedTuple):
    params: Any  # with a filter, the trainable leaves only (None in the frozen ones' places)
    opt_state: Any
    round: jax.Array  # i32[], the server round (for per-round client schedules)
    key: jax.Array
    step: jax.Array  # i32[], local steps taken
    loss_sum: jax.Array  # sum of per-example training losses seen
    count: jax.Array  # examples seen
    linear: Any  # a constant added to every gradient (() when none)
    anchor: Any  # the server params, for the proximal term (() when mu is 0)
    mu: Any  # the proximal coefficient (traced when the state's hparams hold "mu")
    frozen: Any = ()  # the server's frozen leaves (None in the trainable ones' places)


def local_training(model: Model, client_optimizer: ClientOptimizer, *, mu: float = 0.0,
                   linear: Callable[[Broadcast, ClientContext], Any] | None = None,
                   example_dp: ExampleDP | None = None,
                   trainable: filters.Filter | None = None):
    """`(init, step)` of a `ClientUpdate` that trains with `client_optimizer` on
    grad(mean batch loss) + linear + mu (params - server params).

    `linear(broadcast, ctx)` is computed once per client at init (SCAFFOLD: c - c_i); `mu` is
    FedProx's proximal coefficient. With neither, the step is plain local training and the
    program is FedAvg's (no extra work). Padded batch entries are masked before the mean.
    `example_dp` replaces the gradient of the mean batch loss by DP-SGD's
    (`dp_sgd.private_gradient`: per-example clipping, noise, the batch size as denominator).

    `trainable` (any `fs.filters` filter; None: every leaf) trains part of the model: the
    state's params and optimizer state hold the trainable leaves only (per-client memory
    falls with the trained fraction), the loss is taken at those combined with the server's
    frozen leaves (one unbatched copy under the engine's vmap, like the proximal anchor) and
    differentiated with respect to the trainable ones. The proximal term, the linear term
    (only its trainable leaves are read) and DP-SGD's clipping all act on the trainable part:
    a frozen leaf has no gradient to correct or clip. A `finalize` then sees `state.params`
    with None in the frozen leaves' places (`split_trainable` of the broadcast matches it).
    """

    def init(broadcast: Broadcast, ctx: ClientContext) -> LocalState:
        opt = resolve_optimizer(client_optimizer, broadcast.round)
        zero = jnp.zeros((), jnp.result_type(float))  # float64 under jax_enable_x64
        params, frozen = split_trainable(broadcast.params, trainable)
        extra = () if linear is None else split_trainable(linear(broadcast, ctx), trainable)[0]
        # Unchanged by the steps, the anchor (and the frozen leaves) stay one unbatched copy
        # under the engine's vmap.
        anchor = params if mu else ()
        opt_state = opt.init(params)
        if broadcast.hparams.get("client"):
            opt_state = optax.tree_utils.tree_set(opt_state, **broadcast.hparams["client"])
        return LocalState(params, opt_state, broadcast.round, ctx.key, jnp.int32(0), zero, zero,
                          extra, anchor, broadcast.hparams.get("mu", mu) if mu else (), frozen)

    def step(state: LocalState, batch, mask) -> LocalState:
        opt = resolve_optimizer(client_optimizer, state.round)
        # The loss as a function of the trained leaves alone, so only they get gradients.
        on = model if trainable is None else model._replace(
            loss=lambda p, b, k: model.loss(filters.combine(p, state.frozen), b, k))

        def batch_loss(params):
            per_example = on.loss(params, batch, jax.random.fold_in(state.key, state.step))
            total = jnp.sum(jnp.where(mask, per_example, 0.0))
            return total / jnp.maximum(jnp.sum(mask), 1), total

        if example_dp is None:
            (_, total), grads = jax.value_and_grad(batch_loss, has_aux=True)(state.params)
        else:
            grads, total = private_gradient(on, state.params, batch, mask,
                                            jax.random.fold_in(state.key, state.step),
                                            example_dp)
        if linear is not None:
            grads = jax.tree.map(jnp.add, grads, state.linear)
        if mu:
            grads = jax.tree.map(lambda g, p, p0: g + state.mu * (p - p0), grads,
                                 state.params, state.anchor)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        return state._replace(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            step=state.step + 1,
            loss_sum=state.loss_sum + total,
            count=state.count + jnp.sum(mask, dtype=state.count.dtype),
        )

    return init, step


def train_metrics(state: LocalState) -> dict:
    return {"train_loss": state.loss_sum / jnp.maximum(state.count, 1.0),
            "num_steps": state.step}
