"""FedDyn (Acar et al. 2021): dynamic regularization, so each client's local optimum agrees with
the global one.

Client i minimizes L_i(w) - <g_i, w> + (alpha / 2) ||w - x||^2 from x, g_i its gradient state
(0 when first sampled), by local SGD on grad L_i(w) - g_i + alpha (w - x); it keeps
g_i <- g_i - alpha (w_i - x) and sends x - w_i. The server keeps h <- h - alpha (|P| / N)
mean(w_i - x) and sets x <- mean(w_i) - h / alpha: its pseudo-gradient is
mean(x - w_i) + h / alpha, taken by the server optimizer (SGD at 1 is the paper's rule).

References: Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021
  (Algorithm 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms import base
from fedjax_sim.algorithms.fedavg import check_aggregator
from fedjax_sim.algorithms.local import Broadcast, local_training, train_metrics
from fedjax_sim.checks import check_model, check_number, check_optimizer
from fedjax_sim.data.cohort import Batching
from fedjax_sim.engine import ClientResult, ClientUpdate


def feddyn(model, client_optimizer, alpha: float, server_optimizer=None, *, batch_size=10,
           num_epochs=1, max_steps=None, drop_remainder=False, max_examples_per_client=None,
           shuffle=True, client_weighting="uniform", aggregator=None) -> base.FederatedAlgorithm:
    """FedDyn with regularization `alpha` (> 0); clients weighted uniformly, as in the paper."""
    check_model(model)
    alpha = check_number("alpha", alpha, above=0)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    check_optimizer(client_optimizer, "client_optimizer", allow_schedule=True)
    check_optimizer(server_optimizer, "server_optimizer")
    aggregator = check_aggregator(aggregator, client_weighting)
    init_local, step = local_training(model, client_optimizer, mu=float(alpha),
                                      linear=lambda b, ctx: jax.tree.map(jnp.negative,
                                                                         ctx.state))

    def finalize(broadcast, local, ctx):
        d = base.delta(broadcast.params, local.params)  # x - w_i
        g = jax.tree.map(lambda g, d: g + alpha * d, ctx.state, d)
        return ClientResult(d, g, train_metrics(local))

    update = ClientUpdate(init_local, step, finalize)

    def init(params, key):
        return base.init_state(params, key, server_optimizer, aggregator,
                               extra=base.zeros_like(params), client_optimizer=client_optimizer)

    def round_fn(state, inputs, client_states, *, engine):
        cohort = inputs.cohort
        result, d, agg_state, agg_metrics = base.run_pass(
            update, aggregator, state, inputs, Broadcast.of(state),
            engine=engine, client_states=client_states)
        ok = base.included(cohort, result)
        fraction = jnp.sum(ok) / inputs.num_clients  # |P| / N
        h = jax.tree.map(lambda h, d: h + alpha * fraction * d, state.extra, d)
        pseudo = jax.tree.map(lambda d, h: d + h / alpha, d, h)
        new, updates = base.server_step(state, pseudo, server_optimizer, ok.any())
        h = jax.tree.map(lambda n, o: jnp.where(ok.any(), n, o), h, state.extra)
        return (new._replace(agg_state=agg_state, extra=h), result.states,
                base.round_metrics(cohort, result, new, updates, agg_metrics))

    passes = (Batching(batch_size, num_epochs, max_steps, drop_remainder,
                       max_examples_per_client, shuffle),)
    return base.FederatedAlgorithm(init=init, round=round_fn, model=model, passes=passes,
                                   client_state=base.zeros_like, aggregator=aggregator)
