"""SCAFFOLD (Karimireddy et al. 2020): local steps corrected by control variates.

Client i trains with y <- y - lr (g_i(y) - c_i + c) for its K local steps, then (option II)
c_i+ = c_i - c + (x - y) / (K lr); it sends (x - y, c_i+ - c_i) and keeps c_i+ in the client
store. The server averages both, steps its params by the optimizer on the averaged
pseudo-gradient (SGD at the global learning rate eta_g is the paper's x <- x + eta_g mean(dy))
and sets c <- c + (|S| / N) mean(dc). A client sampled for the first time starts from c_i = 0.

References: Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
  Learning", ICML 2020 (Algorithm 1, option II).
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


def scaffold(model, client_lr: float, server_optimizer=None, *, batch_size=10, num_epochs=1,
             max_steps=None, drop_remainder=False, max_examples_per_client=None, shuffle=True,
             client_weighting="uniform", aggregator=None) -> base.FederatedAlgorithm:
    """SCAFFOLD with client SGD at `client_lr`; the server optimizer defaults to SGD at 1.

    Clients are weighted uniformly by default, as in the paper's 1/|S| means.
    """
    check_model(model)
    client_lr = check_number("client_lr", client_lr, above=0)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    check_optimizer(server_optimizer, "server_optimizer")
    aggregator = check_aggregator(aggregator, client_weighting)
    client_sgd = base.injected_sgd(client_lr)
    init_local, step = local_training(
        model, client_sgd,
        linear=lambda b, ctx: jax.tree.map(jnp.subtract, b.extra, ctx.state))

    def finalize(broadcast, local, ctx):
        trained = local.step > 0  # a client with no step keeps its c_i
        scale = 1.0 / (jnp.maximum(local.step, 1).astype(jnp.float32)
                       * broadcast.hparams["client"]["learning_rate"])
        drift = base.delta(broadcast.params, local.params)  # x - y
        # dc = c_i+ - c_i = (x - y) / (K lr) - c, one pass; c_i+ = c_i + dc.
        dc = jax.tree.map(lambda c, d: jnp.where(trained, d * scale - c, 0.0), broadcast.extra,
                          drift)
        c_new = jax.tree.map(jnp.add, ctx.state, dc)
        return ClientResult((drift, dc), c_new, train_metrics(local))

    update = ClientUpdate(init_local, step, finalize)

    def init(params, key):
        return base.init_state(params, key, server_optimizer, aggregator,
                               extra=base.zeros_like(params), client_optimizer=client_sgd)

    def round_fn(state, inputs, client_states, *, engine):
        cohort = inputs.cohort
        result, (dy, dc), agg_state, agg_metrics = base.run_pass(
            update, aggregator, state, inputs, Broadcast.of(state, state.extra),
            engine=engine, client_states=client_states)
        ok = base.included(cohort, result)
        fraction = jnp.sum(ok) / inputs.num_clients  # |S| / N
        c = jax.tree.map(lambda c, d: c + fraction * d, state.extra, dc)
        new, updates = base.server_step(state, dy, server_optimizer, ok.any())
        return (new._replace(agg_state=agg_state, extra=c), result.states,
                base.round_metrics(cohort, result, new, updates, agg_metrics))

    passes = (Batching(batch_size, num_epochs, max_steps, drop_remainder,
                       max_examples_per_client, shuffle),)
    return base.FederatedAlgorithm(init=init, round=round_fn, model=model, passes=passes,
                                   client_state=base.zeros_like, aggregator=aggregator)
