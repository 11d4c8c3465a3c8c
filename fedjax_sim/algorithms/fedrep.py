"""FedRep and FedPer: a shared body trained by every client, a personal head kept by each.

The head (a `fs.filters` filter of the params, e.g. the last layer) stays on the client, in
the client store; a client trains from the server's body and its own head and sends only the
body's update, which the server averages (the head's server leaves never move).
- FedPer (Arivazhagan et al. 2019) trains body and head together in every local step.
- FedRep (Collins et al. 2021, Algorithm 1) first takes `head_steps` local steps on the head
  alone (body fixed), then the rest of its steps on the body alone (head fixed); each part
  has its own optimizer state.
A client's head starts from the server's head the first time it is sampled.

References:
  Arivazhagan, Aggarwal, Singh and Choudhary, "Federated Learning with Personalization
    Layers", 2019.
  Collins, Hassani, Mokhtari and Shakkottai, "Exploiting Shared Representations for
    Personalized Federated Learning", ICML 2021.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import filters
from fedjax_sim.algorithms import base
from fedjax_sim.algorithms.fedavg import check_aggregator
from fedjax_sim.algorithms.local import Broadcast, local_training, train_metrics
from fedjax_sim.checks import check_integer, check_model, check_optimizer
from fedjax_sim.data.cohort import Batching
from fedjax_sim.engine import ClientResult, ClientUpdate


def fedper(model, client_optimizer, server_optimizer=None, *, head, **kwargs):
    """FedPer: body and head trained together; the head is personal (`head`: a filter)."""
    return _body_and_head(model, client_optimizer, server_optimizer, head, None, **kwargs)


def fedrep(model, client_optimizer, server_optimizer=None, *, head, head_steps: int = 10,
           **kwargs):
    """FedRep: each client's first `head_steps` local steps train its head, the rest the
    shared body (`num_epochs`/`max_steps` set the total)."""
    head_steps = check_integer("head_steps", head_steps, 1)
    return _body_and_head(model, client_optimizer, server_optimizer, head, head_steps,
                          **kwargs)


def _body_and_head(model, client_optimizer, server_optimizer, head, head_steps, *,
                   batch_size=10, num_epochs=1, max_steps=None, shuffle=True,
                   client_weighting="num_examples", aggregator=None):
    check_model(model)
    check_optimizer(client_optimizer, "client_optimizer")
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    check_optimizer(server_optimizer, "server_optimizer")
    aggregator = check_aggregator(aggregator, client_weighting)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    is_head = filters.mask(head, shapes)
    is_body = jax.tree.map(lambda m: not m, is_head)
    if not any(jax.tree.leaves(is_body)):
        raise ValueError(f"the head {head!r} selects every leaf: nothing is left to share")
    trained = filters.trained_fraction(shapes, is_body)
    server_optimizer = filters.frozen_updates_zeroed(server_optimizer, is_body)
    if head_steps is not None:  # FedRep; FedPer trains both parts with one optimizer
        client_optimizer = _head_then_body(client_optimizer, is_head, is_body, head_steps)
    init_local, step = local_training(model, client_optimizer)

    def personal(params, own_head):
        return filters.combine(own_head, filters.partition(params, is_head)[1])

    def finalize(broadcast, local, ctx):
        body = filters.partition(base.delta(broadcast.params, local.params), is_body)[0]
        return ClientResult(body, filters.partition(local.params, is_head)[0],
                            train_metrics(local))

    def init(broadcast, ctx):
        return init_local(broadcast._replace(params=personal(broadcast.params, ctx.state)), ctx)

    update = ClientUpdate(init, step, finalize)

    def init_state(params, key):
        filters.mask(head, params)  # the params must have the model's structure
        return base.init_state(params, key, server_optimizer, aggregator, trainable=is_body)

    def round_fn(state, inputs, client_states, *, engine):
        result, body, agg_state, agg_metrics = base.run_pass(
            update, aggregator, state, inputs, Broadcast.of(state), engine=engine,
            client_states=client_states)
        heads = filters.partition(state.params, is_body)[1]
        mean_delta = filters.combine(body, jax.tree.map(jnp.zeros_like, heads))
        ok = base.included(inputs.cohort, result)
        new, updates = base.server_step(state, mean_delta, server_optimizer, ok.any())
        return (new._replace(agg_state=agg_state), result.states,
                base.round_metrics(inputs.cohort, result, new, updates, agg_metrics))

    passes = (Batching(batch_size, num_epochs, max_steps, shuffle=shuffle),)
    return base.FederatedAlgorithm(
        init=init_state, round=round_fn, model=model, passes=passes,
        client_state=lambda params: filters.partition(params, is_head)[0],
        aggregator=aggregator, personal=personal, trained=trained)


def _head_then_body(optimizer, is_head, is_body, head_steps) -> optax.GradientTransformation:
    """`optimizer` on the head for the first `head_steps` updates, then on the body, each part
    with its own state (`optax.masked`); the other part's update is zero."""
    head_opt, body_opt = optax.masked(optimizer, is_head), optax.masked(optimizer, is_body)

    def init(params):
        return jnp.zeros((), jnp.int32), head_opt.init(params), body_opt.init(params)

    def update(grads, state, params=None):
        count, head_state, body_state = state

        def part(mask, opt, opt_state):  # masked passes the rest through: zero it first
            zeroed = jax.tree.map(lambda m, g: g if m else jnp.zeros_like(g), mask, grads)
            return opt.update(zeroed, opt_state, params)

        head_updates, new_head = part(is_head, head_opt, head_state)
        body_updates, new_body = part(is_body, body_opt, body_state)
        on_head = count < head_steps
        pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(on_head, x, y), a, b)
        return pick(head_updates, body_updates), (count + 1, pick(new_head, head_state),
                                                  pick(body_state, new_body))

    return optax.GradientTransformation(init, update)
