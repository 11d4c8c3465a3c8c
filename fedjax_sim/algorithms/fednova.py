"""FedNova (Wang et al. 2020): normalized averaging, so clients that take more local steps do
not pull the model toward their own objective.

Client i, after tau_i local steps of SGD with momentum rho from x, sends its update
x - y_i divided by ||a_i||_1 = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho) (tau_i
for plain SGD), and ||a_i||_1 itself. With p_i the clients' weights, the server's
pseudo-gradient is tau_eff sum_i p_i (x - y_i) / ||a_i||_1, tau_eff = sum_i p_i ||a_i||_1; its
optimizer (SGD at 1 by default: x <- x - that) takes it from there.

References: Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous
  Federated Optimization", NeurIPS 2020 (equations 6-7 and Appendix, FedNova with momentum).
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


def fednova(model, client_lr: float, server_optimizer=None, *, momentum: float = 0.0,
            batch_size=10, num_epochs=1, max_steps=None, drop_remainder=False,
            max_examples_per_client=None, shuffle=True, client_weighting="num_examples",
            aggregator=None) -> base.FederatedAlgorithm:
    """FedNova with client SGD at `client_lr` and heavy-ball `momentum` (0: vanilla)."""
    check_model(model)
    client_lr = check_number("client_lr", client_lr, above=0)
    if not 0 <= check_number("momentum", momentum) < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    check_optimizer(server_optimizer, "server_optimizer")
    aggregator = check_aggregator(aggregator, client_weighting)
    client_sgd = base.injected_sgd(client_lr, momentum)
    init_local, step = local_training(model, client_sgd)

    def finalize(broadcast, local, ctx):
        tau, rho = local.step.astype(jnp.float32), momentum
        norm = tau if not rho else (tau - rho * (1 - rho ** tau) / (1 - rho)) / (1 - rho)
        safe = jnp.maximum(norm, 1.0)  # a client with no step sends nothing (weight 0)
        d = jax.tree.map(lambda u: u / safe, base.delta(broadcast.params, local.params))
        return ClientResult((d, norm), metrics=train_metrics(local))

    update = ClientUpdate(init_local, step, finalize)

    def init(params, key):
        return base.init_state(params, key, server_optimizer, aggregator,
                               client_optimizer=client_sgd)

    def round_fn(state, inputs, client_states, *, engine):
        cohort = inputs.cohort
        result, (d, tau_eff), agg_state, agg_metrics = base.run_pass(
            update, aggregator, state, inputs, Broadcast.of(state),
            engine=engine)
        pseudo = jax.tree.map(lambda x: tau_eff * x, d)
        new, updates = base.server_step(state, pseudo, server_optimizer,
                                        base.included(cohort, result).any())
        return (new._replace(agg_state=agg_state), client_states,
                base.round_metrics(cohort, result, new, updates,
                                   dict(agg_metrics, tau_eff=tau_eff)))

    passes = (Batching(batch_size, num_epochs, max_steps, drop_remainder,
                       max_examples_per_client, shuffle),)
    return base.FederatedAlgorithm(init=init, round=round_fn, model=model, passes=passes,
                                   aggregator=aggregator)
