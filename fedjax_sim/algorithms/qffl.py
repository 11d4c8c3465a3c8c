"""q-FFL, trained by q-FedAvg (Li et al. 2020, "Fair Resource Allocation in Federated
Learning"): clients with a higher loss weigh more, for a more uniform accuracy across clients.

A round has two passes. First each client's loss F_k at the server params w (over all its
examples). Then E epochs of local SGD from w to w_k, and, with L = 1 / client_lr (the
paper's Lipschitz estimate) and dw_k = L (w - w_k), the client sends
Delta_k = F_k^q dw_k and h_k = q F_k^(q-1) ||dw_k||^2 + L F_k^q. The server steps
w <- w - sum_k Delta_k / sum_k h_k. q = 0 is FedAvg with uniform weights.

References: Li et al., "Fair Resource Allocation in Federated Learning", ICLR 2020
  (Algorithm 3, q-FedAvg).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import aggregators
from fedjax_sim.algorithms import base
from fedjax_sim.algorithms.local import Broadcast, local_training, train_metrics
from fedjax_sim.checks import check_model, check_number
from fedjax_sim.data.cohort import Batching
from fedjax_sim.engine import ClientResult, ClientUpdate, run_clients


class LossSum(NamedTuple):
    params: object
    total: jax.Array
    count: jax.Array


def qffl(model, client_lr: float, q: float, *, batch_size=10, num_epochs=1, max_steps=None,
         drop_remainder=False, max_examples_per_client=None,
         shuffle=True) -> base.FederatedAlgorithm:
    """q-FedAvg with client SGD at `client_lr` and fairness `q` (>= 0)."""
    check_model(model)
    client_lr = check_number("client_lr", client_lr, above=0)
    q = check_number("q", q, at_least=0)
    aggregator = aggregators.chain(aggregators.weight_by("uniform"), aggregators.mean())
    zero = lambda: jnp.zeros((), jnp.result_type(float))

    def loss_step(s, batch, mask):
        per = jnp.where(mask, model.loss(s.params, batch, jax.random.key(0)), 0.0)
        return s._replace(total=s.total + jnp.sum(per), count=s.count + jnp.sum(mask))

    losses = ClientUpdate(lambda b, ctx: LossSum(b.params, zero(), zero()), loss_step,
                          lambda b, s, ctx: ClientResult(metrics={
                              "loss_at_w": s.total / jnp.maximum(s.count, 1.0)}))
    client_sgd = base.injected_sgd(client_lr)
    init_local, step = local_training(model, client_sgd)

    def finalize(broadcast, local, ctx):
        f = jnp.maximum(ctx.state, 1e-10)  # F_k, from the first pass
        lipschitz = 1.0 / broadcast.hparams["client"]["learning_rate"]
        dw = jax.tree.map(lambda d: lipschitz * d, base.delta(broadcast.params, local.params))
        sq = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(dw))
        h = q * f ** (q - 1) * sq + lipschitz * f ** q
        return ClientResult((jax.tree.map(lambda d: f ** q * d, dw), h),
                            metrics=dict(train_metrics(local), loss_at_w=ctx.state))

    train = ClientUpdate(init_local, step, finalize)
    server = optax.sgd(1.0)

    def round_fn(state, inputs, client_states, *, engine):
        bcast = Broadcast.of(state)
        first = run_clients(losses, inputs.cohorts[0], inputs.pool, bcast,
                            jax.random.fold_in(base.round_key(state), 0), engine=engine)
        result, (delta, h), agg_state, agg_metrics = base.run_pass(
            train, aggregator, state, inputs, bcast, engine=engine,
            client_states=first.metrics["loss_at_w"], salt=1)
        ok = base.included(inputs.cohort, result)
        pseudo = jax.tree.map(lambda d: d / jnp.where(h > 0, h, 1.0), delta)
        new, updates = base.server_step(state, pseudo, server, ok.any())
        return (new._replace(agg_state=agg_state), client_states,
                base.round_metrics(inputs.cohort, result, new, updates, agg_metrics))

    passes = (Batching(None, 1, 1, False, max_examples_per_client, False),
              Batching(batch_size, num_epochs, max_steps, drop_remainder,
                       max_examples_per_client, shuffle))
    return base.FederatedAlgorithm(
        init=lambda params, key: base.init_state(params, key, server, aggregator,
                                                  client_optimizer=client_sgd),
        round=round_fn, model=model, passes=passes)
