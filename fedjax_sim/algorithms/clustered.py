"""Clustered personalization (HypCluster, IFCA): k models on the server, and each client trained
with the one that fits its data best.

A round has two engine passes over the same clients:
1. each client's mean training loss under each of the k models over all its examples (one
   unshuffled epoch, no training); its cluster j is the one of lowest loss (ties: lowest j;
   a loss that is not finite counts as infinite, so a diverged model attracts nobody);
2. local training of model j with the client optimizer; the client sends its update for
   cluster j only and keeps j in the client store.
The server averages each cluster's updates over the clients that chose it and steps each
cluster with its own server optimizer state (the optimizer vmapped over the stack: every
state leaf is [k], injected hyperparameters too); a cluster no client chose keeps its model
and state. Server SGD at 1 (the default) sets each chosen model to the mean of its clients'
models, the papers' rule. HypCluster weighs a cluster's clients by example count (it
minimizes sum_k m_k L_k(h_f(k))), IFCA's model averaging weighs them equally
(theta_j = sum_i s_ij theta_i / sum_i s_ij); otherwise the rule is one.

The k models are the server params, stacked: every leaf has a leading [k] axis. There, not
in `ServerState.extra`, the broadcast carries all k to each client, the engine and the
checkpoints treat them as any params, and evaluation's `personal(params, row)`, which sees
only the params, can take a client's model from them. `algorithm.model` is the stack as a
`Model` (`stacked_model`): its `init` draws k independent initializations, so a run starts
from k distinct models, and its `loss` and `metrics` are cluster 0's. The global evaluation
("eval") therefore reports cluster 0; personalized evaluation reports each client with the
cluster it last chose, and a client never sampled with the one of lowest loss on its
training split (a pass over it: `personal_pass`). A model whose init ignores its key
(`logistic_regression`'s zeros) starts with k equal models, whose ties go to cluster 0:
give it params stacked from distinct ones.

A client's output is the [k]-stack with only row j non-zero, so the streamed sum gives every
cluster's sum at once; each cluster's weight comes from the choices themselves (a one-hot
summed beside the update would count in its norm). That simulates an uplink of k models per
client: k times the reduction's work and memory, not the training's, which is acceptable for
the few clusters these methods use. A real client sends its update and j (or, under secure
aggregation, which must hide j, the whole stack).

References:
  Mansour, Mohri, Ro and Suresh, "Three Approaches for Personalization with Applications to
    Federated Learning", 2020 (HypCluster).
  Ghosh, Chung, Yin and Ramchandran, "An Efficient Framework for Clustered Federated
    Learning", NeurIPS 2020 (IFCA, option II: model averaging).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from fedjax_sim import aggregators, client_store
from fedjax_sim.algorithms import base
from fedjax_sim.algorithms.local import Broadcast, local_training, train_metrics
from fedjax_sim.checks import check_integer, check_model, check_optimizer
from fedjax_sim.data.cohort import Batching
from fedjax_sim.engine import ClientResult, ClientUpdate, run_clients
from fedjax_sim.models.core import Model


def stacked_model(model: Model, k: int) -> Model:
    """`model` k times over, its params stacked on a leading [k] axis: `init(key)` stacks
    `model.init(fold_in(key, j))` for j < k; `loss` and `metrics` are row 0's (a client's
    own model is the one-row stack of its cluster)."""
    def init(key):
        models = [model.init(jax.random.fold_in(key, j)) for j in range(k)]
        return jax.tree.map(lambda *rows: jnp.stack(rows), *models)

    first = lambda params: jax.tree.map(lambda p: p[0], params)
    return model._replace(init=init, loss=lambda p, batch, key: model.loss(first(p), batch, key),
                          metrics=lambda p, batch: model.metrics(first(p), batch))


class _Losses(NamedTuple):
    models: Any  # the k-stack, unchanged by the steps
    key: jax.Array
    step: jax.Array
    sums: jax.Array  # [k]: each model's summed loss over the examples seen
    count: jax.Array


def _losses_pass(model: Model, k: int, *, evaluation: bool = False) -> ClientUpdate:
    """A client's mean training loss under each of the k models (metric "cluster_loss", not
    finite: inf); in `evaluation`, its state: its stored cluster, or for a client never
    sampled (-1) the one of lowest loss."""
    def init(models, ctx):
        zero = jnp.zeros((), jnp.result_type(float))
        return _Losses(models, ctx.key, jnp.int32(0), jnp.zeros((k,), zero.dtype), zero)

    def step(local, batch, mask):
        key = jax.random.fold_in(local.key, local.step)
        per_example = jax.vmap(lambda p: model.loss(p, batch, key))(local.models)
        return local._replace(step=local.step + 1,
                              sums=local.sums + jnp.sum(jnp.where(mask, per_example, 0.0), 1),
                              count=local.count + jnp.sum(mask, dtype=local.count.dtype))

    def finalize(models, local, ctx):
        loss = local.sums / jnp.maximum(local.count, 1)
        loss = jnp.where(jnp.isfinite(loss), loss, jnp.inf)
        if evaluation:
            return ClientResult(state=jnp.where(ctx.state >= 0, ctx.state,
                                                jnp.argmin(loss).astype(jnp.int32)))
        return ClientResult(metrics={"cluster_loss": loss})

    return ClientUpdate(init, step, finalize)


def _row(stack, j):
    return jax.tree.map(lambda p: p[j], stack)


def _by_cluster(v, x):
    """`v` [k] shaped to broadcast against the stacked leaf `x`."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _clustered(model, client_optimizer, num_clusters, server_optimizer, *, batch_size,
               num_epochs, max_steps, shuffle, client_weighting) -> base.FederatedAlgorithm:
    check_model(model)
    k = check_integer("num_clusters", num_clusters, 1)
    check_optimizer(client_optimizer, "client_optimizer", allow_schedule=True)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    check_optimizer(server_optimizer, "server_optimizer")
    # Each cluster's optimizer state is its own (Adam's count too): the optimizer vmapped.
    per_cluster = optax.GradientTransformation(jax.vmap(server_optimizer.init),
                                               jax.vmap(server_optimizer.update))
    aggregator = aggregators.chain(aggregators.weight_by(client_weighting),
                                   aggregators.weighted_sum())
    losses = _losses_pass(model, k)
    init_local, step = local_training(model, client_optimizer)

    def init(broadcast, ctx):  # ctx.state: this round's cluster
        return init_local(broadcast._replace(params=_row(broadcast.params, ctx.state)), ctx)

    def finalize(broadcast, local, ctx):
        j = ctx.state
        mine = jnp.arange(k) == j
        delta = base.delta(_row(broadcast.params, j), local.params)
        output = jax.tree.map(lambda d: jnp.where(_by_cluster(mine, d[None]), d[None], 0),
                              delta)
        return ClientResult(output, j, dict(train_metrics(local), cluster=j))

    train = ClientUpdate(init, step, finalize)

    def round_fn(state, inputs, client_states, *, engine):
        key = base.round_key(state)
        loss = run_clients(losses, inputs.cohorts[0], inputs.pool, state.params,
                           jax.random.fold_in(key, 2), engine=engine).metrics["cluster_loss"]
        cluster = jnp.argmin(loss, axis=1).astype(jnp.int32)
        result, sums, agg_state, agg_metrics = base.run_pass(
            train, aggregator, state, inputs, Broadcast.of(state), engine=engine,
            client_states=cluster)
        cohort, ok = inputs.cohort, base.included(inputs.cohort, result)
        # The weights the streamed sum gave each client, summed per cluster.
        weight = jnp.where(ok, cohort.weights, 0.0)
        if client_weighting == "num_examples":
            weight = weight * cohort.num_examples.astype(jnp.float32)
        totals = jax.ops.segment_sum(weight, cluster, k)
        chosen = totals > 0
        safe = jnp.where(chosen, totals, 1.0)
        mean = jax.tree.map(lambda s: s / _by_cluster(safe, s), sums)
        updates, opt_state = per_cluster.update(mean, state.opt_state, state.params)
        keep = lambda new, old: jax.tree.map(
            lambda n, o: jnp.where(_by_cluster(chosen, n), n, o), new, old)
        new = state._replace(params=keep(optax.apply_updates(state.params, updates),
                                         state.params),
                             opt_state=keep(opt_state, state.opt_state), agg_state=agg_state,
                             round=state.round + 1)
        counts = jax.ops.segment_sum(ok.astype(jnp.int32), cluster, k)
        metrics = dict(agg_metrics, **{f"cluster_{j}_clients": counts[j] for j in range(k)})
        states = result.states
        if isinstance(client_states, client_store.InScan):  # the whole store: write it here
            states = client_store.scatter(client_states.store, cohort.client_ids, states,
                                          client_states.num_clients, result.metrics["finite"])
        return new, states, base.round_metrics(cohort, result, new,
                                               keep(updates, base.zeros_like(updates)),
                                               metrics)

    def init_state(params, key):
        return base.init_state(params, key, per_cluster, aggregator,
                               client_optimizer=client_optimizer)

    def check_data(train):
        if k > train.num_clients:
            raise ValueError(f"num_clusters={k} is more than the {train.num_clients} clients "
                             "of the population: a cluster needs a client to choose it")

    passes = (Batching(batch_size, 1, None, shuffle=False),
              Batching(batch_size, num_epochs, max_steps, shuffle=shuffle))
    return base.FederatedAlgorithm(
        init=init_state, round=round_fn, model=stacked_model(model, k), passes=passes,
        client_state=lambda params: jnp.int32(-1), aggregator=aggregator,
        personal=_cluster_model,
        personal_pass=(passes[0], _losses_pass(model, k, evaluation=True)),
        check_data=check_data)


def _cluster_model(params, cluster):
    """A client's own model: the one-row stack of its cluster."""
    return jax.tree.map(lambda p: lax.dynamic_slice_in_dim(p, cluster, 1), params)


def hypcluster(model, client_optimizer, num_clusters: int, server_optimizer=None, *,
               batch_size=10, num_epochs=1, max_steps=None,
               shuffle=True) -> base.FederatedAlgorithm:
    """HypCluster (Mansour et al. 2020) with `num_clusters` models: each cluster's clients
    weighted by example count. Params are a [num_clusters]-stack (`algorithm.model.init`).

    Example:
      >>> import optax, fedjax_sim as fs
      >>> algo = hypcluster(fs.models.mlp(60, 10), optax.sgd(0.1), 3)
    """
    return _clustered(model, client_optimizer, num_clusters, server_optimizer,
                      batch_size=batch_size, num_epochs=num_epochs, max_steps=max_steps,
                      shuffle=shuffle, client_weighting="num_examples")


def ifca(model, client_optimizer, num_clusters: int, server_optimizer=None, *, batch_size=10,
         num_epochs=1, max_steps=None, shuffle=True) -> base.FederatedAlgorithm:
    """IFCA with model averaging (Ghosh et al. 2020) and `num_clusters` models: each
    cluster's clients weighted equally. Params are a [num_clusters]-stack
    (`algorithm.model.init`).

    Example:
      >>> import optax, fedjax_sim as fs
      >>> algo = ifca(fs.models.mlp(60, 10), optax.sgd(0.1), 2)
    """
    return _clustered(model, client_optimizer, num_clusters, server_optimizer,
                      batch_size=batch_size, num_epochs=num_epochs, max_steps=max_steps,
                      shuffle=shuffle, client_weighting="uniform")
