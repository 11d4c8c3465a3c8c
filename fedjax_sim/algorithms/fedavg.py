"""FedAvg and the FedOpt family (FedAvgM, FedAdam, FedYogi, FedAdagrad), and FedSGD.

Clients train with any optax optimizer from the server's params and send the pseudo-gradient
`server_params - client_params`; the aggregator averages them (weighted by example count or
uniformly); the server treats the average as a gradient for any optax optimizer. Server SGD at
learning rate 1 is plain FedAvg (the new params are the weighted mean of the client params).

References:
  McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017 (FedAvg, FedSGD).
  Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (FedOpt, Algorithm 2).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import aggregators as aggregators_lib
from fedjax_sim.algorithms.base import (
    ClientOptimizer,
    FederatedAlgorithm,
    RoundMetrics,
    ServerState,
    resolve_optimizer,
    tree_norm,
)
from fedjax_sim.checks import check_model, check_optimizer
from fedjax_sim.client import ClientUpdate, Engine, run_clients
from fedjax_sim.data.cohort import Batching
from fedjax_sim.models.core import Model


class LocalState(NamedTuple):
    params: Any
    opt_state: Any
    round: jax.Array  # i32[], the server round (for per-round client schedules)
    key: jax.Array
    step: jax.Array  # i32[], local steps taken
    loss_sum: jax.Array  # f32[], sum of per-example training losses seen
    count: jax.Array  # f32[], examples seen


def optimizer_client_update(model: Model, client_optimizer: ClientOptimizer) -> ClientUpdate:
    """Local training with an optax optimizer; the output is `server_params - client_params`.

    The broadcast is `(server_params, round)`. Each step averages the loss over the batch's
    real examples (padded entries are masked before the reduction).
    """

    def init(broadcast, key):
        params, round_num = broadcast
        opt = resolve_optimizer(client_optimizer, round_num)
        zero = jnp.zeros((), jnp.float32)
        return LocalState(params, opt.init(params), round_num, key, jnp.int32(0), zero, zero)

    def step(state, batch, mask):
        opt = resolve_optimizer(client_optimizer, state.round)

        def batch_loss(params):
            per_example = model.loss(params, batch, jax.random.fold_in(state.key, state.step))
            total = jnp.sum(jnp.where(mask, per_example, 0.0))
            return total / jnp.maximum(jnp.sum(mask), 1), total

        (_, total), grads = jax.value_and_grad(batch_loss, has_aux=True)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        return state._replace(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            step=state.step + 1,
            loss_sum=state.loss_sum + total,
            count=state.count + jnp.sum(mask, dtype=jnp.float32),
        )

    def finalize(broadcast, state):
        server_params, _ = broadcast
        delta = jax.tree.map(jnp.subtract, server_params, state.params)
        metrics = {
            "train_loss": state.loss_sum / jnp.maximum(state.count, 1.0),
            "num_steps": state.step,
        }
        return delta, metrics

    return ClientUpdate(init=init, step=step, finalize=finalize)


def fedopt(
    model: Model,
    client_optimizer: ClientOptimizer,
    server_optimizer: optax.GradientTransformation | None = None,
    *,
    batch_size: int | None = 10,
    num_epochs: int = 1,
    max_steps: int | None = None,
    drop_remainder: bool = False,
    max_examples_per_client: int | None = None,
    shuffle: bool = True,
    client_weighting: Literal["num_examples", "uniform"] = "num_examples",
    aggregator: aggregators_lib.Aggregator | None = None,
) -> FederatedAlgorithm:
    """Federated optimization with any client and server optax optimizers.

    Args:
      model: the model to train.
      client_optimizer: an optax transformation, or `round -> transformation` for per-round
        schedules; an optax schedule inside it runs over local steps.
      server_optimizer: applied to the averaged pseudo-gradient; default `optax.sgd(1.0)`
        (FedAvg). Optax schedules in it run over rounds.
      batch_size, num_epochs, max_steps, drop_remainder, max_examples_per_client, shuffle: how
        each client walks its data (see `Batching`); `batch_size=None` is one full batch.
      client_weighting: weight clients by example count or uniformly.
      aggregator: default the weighted mean.

    Example:
      >>> import optax, fedjax_sim as fs
      >>> model = fs.models.logistic_regression(60, 10)
      >>> algo = fedopt(model, optax.sgd(0.1), optax.adam(0.01), batch_size=10)
    """
    check_model(model)
    if client_weighting not in ("num_examples", "uniform"):
        raise ValueError(
            f"client_weighting must be 'num_examples' or 'uniform', got {client_weighting!r}")
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    check_optimizer(client_optimizer, "client_optimizer", allow_schedule=True)
    check_optimizer(server_optimizer, "server_optimizer")
    aggregator = aggregators_lib.mean() if aggregator is None else aggregator
    if not isinstance(aggregator, aggregators_lib.Aggregator):
        raise TypeError(f"aggregator must be a fs.aggregators.Aggregator, e.g. "
                        f"fs.aggregators.mean(), got {type(aggregator).__name__} "
                        f"{aggregator!r}"[:300])
    update = optimizer_client_update(model, client_optimizer)
    batching = Batching(batch_size, num_epochs, max_steps, drop_remainder,
                        max_examples_per_client, shuffle)

    def init(params):
        params = jax.tree.map(jnp.asarray, params)
        return ServerState(params, server_optimizer.init(params), aggregator.init(params),
                           jnp.int32(0))

    def round_fn(state, cohort, pool, key, *, batch_size, engine: Engine):
        # Client keys fold the client id into fold_in(key, 0); the server's key is separate.
        results = run_clients(update, aggregator, state.agg_state, (state.params, state.round),
                              cohort, pool, jax.random.fold_in(key, 0), batch_size=batch_size,
                              engine=engine)
        mean_delta, agg_state = aggregator.finalize(results.total, state.agg_state,
                                                    jax.random.fold_in(key, 1))
        updates, opt_state = server_optimizer.update(mean_delta, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        real = cohort.weights > 0
        included = real & results.finite
        any_included = jnp.any(included)
        # With no client left there is nothing to learn from: keep params and optimizer state.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(any_included, n, o), new, old)
        new_state = ServerState(
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            agg_state=agg_state,
            round=state.round + 1,
        )
        n = cohort.num_examples.astype(jnp.float32) * included
        loss = results.metrics["train_loss"]
        total = jnp.sum(jnp.where(included, loss, 0.0) * n) / jnp.maximum(jnp.sum(n), 1.0)
        train_loss = jnp.where(any_included, total, jnp.nan)
        clients = dict(results.metrics, num_examples=cohort.num_examples,
                       update_norm=results.norms, finite=results.finite,
                       client_ids=cohort.client_ids)
        return new_state, RoundMetrics(
            train_loss=train_loss,
            num_included=jnp.sum(included, dtype=jnp.int32),
            num_excluded=jnp.sum(real & ~results.finite, dtype=jnp.int32),
            update_norm=jnp.where(any_included, tree_norm(updates), 0.0),
            params_norm=tree_norm(new_state.params),
            clients=clients,
        )

    return FederatedAlgorithm(init=init, round=round_fn, model=model, batching=batching,
                              client_weighting=client_weighting)


def fedavg(model: Model, client_optimizer: ClientOptimizer,
           server_optimizer: optax.GradientTransformation | None = None,
           **kwargs) -> FederatedAlgorithm:
    """FedAvg (McMahan et al. 2017): `fedopt` with server SGD at learning rate 1 by default.

    Example:
      >>> import optax, fedjax_sim as fs
      >>> algo = fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.01), batch_size=10)
    """
    return fedopt(model, client_optimizer, server_optimizer, **kwargs)


def fedsgd(model: Model, server_optimizer: optax.GradientTransformation,
           **kwargs) -> FederatedAlgorithm:
    """FedSGD (McMahan et al. 2017): each client takes one full-batch gradient of its data
    (client SGD at learning rate 1, one step), the server averages the gradients weighted by
    example count and applies `server_optimizer`.
    """
    fixed = {"batch_size", "num_epochs", "max_steps"} & set(kwargs)
    if fixed:
        raise TypeError(f"fedsgd takes one full-batch step per client, so it does not take "
                        f"{sorted(fixed)}: use fedavg (or fedopt) to choose the local work")
    return fedopt(model, optax.sgd(1.0), server_optimizer, batch_size=None, num_epochs=1,
                  max_steps=1, **kwargs)
