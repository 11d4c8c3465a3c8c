"""Agnostic federated learning (Mohri et al. 2019): a model for the worst mixture of the client
domains, trained by stochastic mirror descent on min_w max_lambda sum_d lambda_d L_d(w).

Each client belongs to a domain (an integer feature, the same for all its examples). A round
averages the client updates within each domain (weighted by examples) and steps the server's
params on sum_d lambda_d mean_d(update), over the domains present in the cohort; then the
domain weights move by projected gradient ascent, lambda <- proj_simplex(lambda +
domain_lr L), L_d the domain's mean training loss this round (0 for absent domains).

References: Mohri, Sivek and Suresh, "Agnostic Federated Learning", ICML 2019 (Algorithm 1,
  Stochastic-AFL).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import aggregators
from fedjax_sim.algorithms import base
from fedjax_sim.algorithms.local import Broadcast, local_training, train_metrics
from fedjax_sim.checks import check_integer, check_model, check_number, check_optimizer
from fedjax_sim.data.cohort import Batching
from fedjax_sim.engine import ClientResult, ClientUpdate


def project_simplex(v: jax.Array) -> jax.Array:
    """The Euclidean projection of `v` onto the probability simplex (Duchi et al. 2008)."""
    u = jnp.sort(v)[::-1]
    cumulative = jnp.cumsum(u) - 1
    k = jnp.arange(1, v.shape[0] + 1)
    rho = jnp.max(jnp.where(u - cumulative / k > 0, k, 0))
    return jnp.maximum(v - cumulative[rho - 1] / rho, 0)


def agnostic_fedavg(model, client_optimizer, num_domains: int, server_optimizer=None, *,
                    domain: str = "domain", domain_lr: float = 0.1, batch_size=10,
                    num_epochs=1, max_steps=None, drop_remainder=False,
                    max_examples_per_client=None, shuffle=True) -> base.FederatedAlgorithm:
    """Agnostic FedAvg over `num_domains` domains read from the feature `domain`."""
    check_model(model)
    num_domains = check_integer("num_domains", num_domains, 1)
    domain_lr = check_number("domain_lr", domain_lr, above=0)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    check_optimizer(client_optimizer, "client_optimizer", allow_schedule=True)
    check_optimizer(server_optimizer, "server_optimizer")
    aggregator = aggregators.chain(aggregators.weight_by("num_examples"), aggregators.mean())
    init_local, inner_step = local_training(model, client_optimizer)

    def init(broadcast, ctx):
        return init_local(broadcast, ctx), jnp.int32(0)

    def step(state, batch, mask):  # the client's domain, from its first batch
        local, d = state
        return inner_step(local, batch, mask), jnp.where(local.step == 0,
                                                          batch[domain][0].astype(jnp.int32), d)

    def finalize(broadcast, state, ctx):
        local, d = state
        metrics = train_metrics(local)
        onehot = jax.nn.one_hot(d, num_domains, dtype=jnp.float32)
        per_domain = jax.tree.map(lambda u: onehot.reshape((-1,) + (1,) * u.ndim) * u,
                                  base.delta(broadcast.params, local.params))
        return ClientResult((per_domain, onehot * metrics["train_loss"], onehot),
                            metrics=dict(metrics, domain=d))

    update = ClientUpdate(init, step, finalize)

    def round_fn(state, inputs, client_states, *, engine):
        result, (sums, losses, shares), agg_state, agg_metrics = base.run_pass(
            update, aggregator, state, inputs, Broadcast.of(state),
            engine=engine)
        present = shares > 0
        safe = jnp.where(present, shares, 1.0)
        lam = state.extra
        mix = jnp.where(present, lam, 0.0)
        mix = mix / jnp.maximum(jnp.sum(mix), 1e-12)
        pseudo = jax.tree.map(lambda s: jnp.tensordot(mix / safe, s, axes=1), sums)
        ok = base.included(inputs.cohort, result)
        new, updates = base.server_step(state, pseudo, server_optimizer, ok.any())
        domain_loss = jnp.where(present, losses / safe, 0.0)
        lam = jnp.where(ok.any(), project_simplex(lam + domain_lr * domain_loss), lam)
        metrics = dict(agg_metrics, **{f"lambda_{d}": lam[d] for d in range(num_domains)})
        return (new._replace(agg_state=agg_state, extra=lam), client_states,
                base.round_metrics(inputs.cohort, result, new, updates, metrics))

    def init_state(params, key):
        uniform = jnp.full((num_domains,), 1.0 / num_domains, jnp.float32)
        return base.init_state(params, key, server_optimizer, aggregator, extra=uniform,
                               client_optimizer=client_optimizer)

    passes = (Batching(batch_size, num_epochs, max_steps, drop_remainder,
                       max_examples_per_client, shuffle),)
    return base.FederatedAlgorithm(init=init_state, round=round_fn, model=model, passes=passes,
                                   id_features=((domain, num_domains),))
