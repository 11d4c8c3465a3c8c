"""Mime and MimeLite (Karimireddy et al. 2021): clients step with the server optimizer's update
rule under its frozen state, so a momentum or adaptive optimizer acts as it would centrally.

A round has two engine passes over the same clients:
1. each client's full-batch gradient at the server params x; their mean c updates the
   optimizer state once per round, s <- V(s, c) (the server's optimizer step on c, its
   update discarded);
2. local training from x: y <- y + U(g, s), U the optimizer's update with s held fixed,
   where g = grad f_i(y; batch) (MimeLite) or grad f_i(y; batch) - grad f_i(x; batch) + c
   (Mime, an SVRG correction; c comes from pass 1 of the same round).
The server takes the mean of the clients' params: x <- x - mean(x - y).

References: Karimireddy et al., "Breaking the centralized barrier for cross-device federated
  learning", NeurIPS 2021 (Algorithm 1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms import base
from fedjax_sim.algorithms.fedavg import check_aggregator
from fedjax_sim.checks import check_model, check_optimizer
from fedjax_sim.data.cohort import Batching
from fedjax_sim.engine import ClientResult, ClientUpdate


class Local(NamedTuple):
    params: jax.Array
    key: jax.Array
    step: jax.Array
    loss_sum: jax.Array
    count: jax.Array
    frozen: tuple  # (x, s, c) in training: unchanged by the steps, one unbatched copy


def _grad(model, params, batch, mask, key):
    def loss(p):
        total = jnp.sum(jnp.where(mask, model.loss(p, batch, key), 0.0))
        return total / jnp.maximum(jnp.sum(mask), 1), total

    return jax.value_and_grad(loss, has_aux=True)(params)


def _mime(model, optimizer, *, svrg, batch_size, num_epochs, max_steps, drop_remainder,
          max_examples_per_client, shuffle, client_weighting, aggregator):
    check_model(model)
    check_optimizer(optimizer, "optimizer")
    aggregator = check_aggregator(aggregator, client_weighting)
    zero = lambda: jnp.zeros((), jnp.result_type(float))

    def grad_init(b, ctx):  # b: (x, s, c); the gradient pass needs only x
        return Local(b[0], ctx.key, jnp.int32(0), zero(), zero(), ())

    def train_init(b, ctx):
        return Local(b[0], ctx.key, jnp.int32(0), zero(), zero(), b)

    def grad_step(local, batch, mask):
        (_, total), g = _grad(model, local.params, batch, mask, local.key)
        return local._replace(params=g, step=local.step + 1, loss_sum=total,
                              count=jnp.sum(mask, dtype=local.count.dtype))

    def grad_finalize(b, local, ctx):  # the full batch's mean gradient (Local.params holds it)
        return ClientResult(local.params)

    def train_step(local, batch, mask):
        x, s, c = local.frozen
        key = jax.random.fold_in(local.key, local.step)
        (_, total), g = _grad(model, local.params, batch, mask, key)
        if svrg:
            _, gx = _grad(model, x, batch, mask, key)
            g = jax.tree.map(lambda g, gx, c: g - gx + c, g, gx, c)
        updates, _ = optimizer.update(g, s, local.params)  # U(g, s): s stays frozen
        return local._replace(params=optax.apply_updates(local.params, updates),
                              step=local.step + 1, loss_sum=local.loss_sum + total,
                              count=local.count + jnp.sum(mask, dtype=local.count.dtype))

    def train_finalize(b, local, ctx):
        metrics = {"train_loss": local.loss_sum / jnp.maximum(local.count, 1.0),
                   "num_steps": local.step}
        return ClientResult(base.delta(b[0], local.params), metrics=metrics)

    grads = ClientUpdate(grad_init, grad_step, grad_finalize)
    train = ClientUpdate(train_init, train_step, train_finalize)
    server_sgd = optax.sgd(1.0)  # x <- mean of the clients' params

    def round_fn(state, inputs, client_states, *, engine):
        (gpass, tpass), s = inputs.cohorts, state.extra
        res, c, _, _ = base.run_pass(grads, aggregator, state, inputs, (state.params, s, ()),
                                     engine=engine, pass_index=0)
        result, mean_delta, agg_state, agg_metrics = base.run_pass(
            train, aggregator, state, inputs, (state.params, s, c), engine=engine, salt=1)
        ok = base.included(tpass, result) & base.included(gpass, res)
        new, updates = base.server_step(state, mean_delta, server_sgd, ok.any())
        _, s_new = optimizer.update(c, s, state.params)  # s <- V(s, c)
        s_new = jax.tree.map(lambda n, o: jnp.where(ok.any(), n, o), s_new, s)
        return (new._replace(agg_state=agg_state, extra=s_new), client_states,
                base.round_metrics(tpass, result, new, updates, agg_metrics))

    def init_state(params, key):
        params = jax.tree.map(jnp.asarray, params)
        return base.init_state(params, key, server_sgd, aggregator, extra=optimizer.init(params))

    passes = (Batching(None, 1, 1, False, max_examples_per_client, False),
              Batching(batch_size, num_epochs, max_steps, drop_remainder,
                       max_examples_per_client, shuffle))
    return base.FederatedAlgorithm(init=init_state, round=round_fn, model=model, passes=passes,
                                   aggregator=aggregator)


def mimelite(model, optimizer: optax.GradientTransformation, *, batch_size=10, num_epochs=1,
             max_steps=None, drop_remainder=False, max_examples_per_client=None, shuffle=True,
             client_weighting="num_examples", aggregator=None) -> base.FederatedAlgorithm:
    """MimeLite: clients apply `optimizer`'s update rule with the server's frozen state
    (e.g. `optax.sgd(0.1, momentum=0.9)`); the state moves once a round on the full-batch
    gradient at the server params."""
    return _mime(model, optimizer, svrg=False, batch_size=batch_size, num_epochs=num_epochs,
                 max_steps=max_steps, drop_remainder=drop_remainder,
                 max_examples_per_client=max_examples_per_client, shuffle=shuffle,
                 client_weighting=client_weighting, aggregator=aggregator)


def mime(model, optimizer: optax.GradientTransformation, *, batch_size=10, num_epochs=1,
         max_steps=None, drop_remainder=False, max_examples_per_client=None, shuffle=True,
         client_weighting="num_examples", aggregator=None) -> base.FederatedAlgorithm:
    """Mime: MimeLite whose local gradients carry the SVRG correction
    grad f_i(y) - grad f_i(x) + c, with c the cohort's mean full-batch gradient at x."""
    return _mime(model, optimizer, svrg=True, batch_size=batch_size, num_epochs=num_epochs,
                 max_steps=max_steps, drop_remainder=drop_remainder,
                 max_examples_per_client=max_examples_per_client, shuffle=shuffle,
                 client_weighting=client_weighting, aggregator=aggregator)
