"""FedAvg and the FedOpt family (FedAvgM, FedAdam, FedYogi, FedAdagrad), and FedSGD.

Clients train with any optax optimizer from the server's params and send the pseudo-gradient
`server_params - client_params`; the aggregator averages them (weighted by example count or
uniformly); the server treats the average as a gradient for any optax optimizer. Server SGD at
learning rate 1 is plain FedAvg (the new params are the weighted mean of the client params).
With a filter (`trainable`), clients train and send only the leaves it selects.

References:
  McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017 (FedAvg, FedSGD).
  Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (FedOpt, Algorithm 2).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import aggregators as aggregators_lib
from fedjax_sim import filters
from fedjax_sim.algorithms.base import (
    ClientOptimizer,
    FederatedAlgorithm,
    delta,
    included,
    init_state,
    round_metrics,
    run_pass,
    server_step,
)
from fedjax_sim.algorithms.dp_sgd import ExampleDP
from fedjax_sim.algorithms.local import (
    Broadcast,
    local_training,
    split_trainable,
    train_metrics,
)
from fedjax_sim.checks import check_model, check_optimizer
from fedjax_sim.data.cohort import Batching
from fedjax_sim.engine import ClientResult, ClientUpdate, Engine
from fedjax_sim.models.core import Model


def optimizer_client_update(model: Model, client_optimizer: ClientOptimizer, *,
                            mu: float = 0.0, example_dp: ExampleDP | None = None,
                            trainable: filters.Filter | None = None) -> ClientUpdate:
    """Local training with an optax optimizer (`local_training`, DP-SGD with `example_dp`,
    the leaves `trainable` selects); the output is `server_params - client_params` of the
    trained leaves (None in the frozen ones' places)."""
    init, step = local_training(model, client_optimizer, mu=mu, example_dp=example_dp,
                                trainable=trainable)

    def finalize(broadcast, state, ctx):
        sent = split_trainable(broadcast.params, trainable)[0]
        return ClientResult(delta(sent, state.params), metrics=train_metrics(state))

    return ClientUpdate(init=init, step=step, finalize=finalize)


def check_aggregator(aggregator, client_weighting, *,
                     client_state: bool = False) -> aggregators_lib.Aggregator:
    """The aggregator chain: the given chain, a single reduction weighted by
    `client_weighting`, or FedAvg's default. A chain whose stages keep per-client state
    (top-k's error feedback) is refused unless the algorithm carries it (`client_state`)."""
    if aggregator is None:
        return aggregators_lib.default(client_weighting)
    if not isinstance(aggregator, aggregators_lib.Aggregator):
        raise TypeError(f"aggregator must be a fs.aggregators.Aggregator, e.g. "
                        f"fs.aggregators.mean(), got {type(aggregator).__name__} "
                        f"{aggregator!r}"[:300])
    if aggregator.name != "chain":
        aggregator = aggregators_lib.chain(aggregators_lib.weight_by(client_weighting),
                                           aggregator)
    if aggregator.client_state is not None and not client_state:
        raise ValueError("this aggregator keeps per-client state in the client store (top_k's "
                         "error feedback), which only the FedOpt family (fedopt, fedavg, "
                         "fedprox) carries: use one of those, or top_k(error_feedback=False)")
    return aggregator


def delta_round(update: ClientUpdate, aggregator: aggregators_lib.Aggregator,
                server_optimizer: optax.GradientTransformation):
    """The round of an algorithm whose clients send `server_params - client_params` and keep
    a state in the client store (Ditto, APFL, pFedMe): one pass, the server's step on the
    aggregate, and the clients' new states for the store."""

    def round_fn(state, inputs, client_states, *, engine: Engine):
        result, mean_delta, agg_state, agg_metrics = run_pass(
            update, aggregator, state, inputs, Broadcast.of(state), engine=engine,
            client_states=client_states)
        ok = included(inputs.cohort, result)
        new, updates = server_step(state, mean_delta, server_optimizer, ok.any())
        return (new._replace(agg_state=agg_state), result.states,
                round_metrics(inputs.cohort, result, new, updates, agg_metrics))

    return round_fn


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
    mu: float = 0.0,
    straggler_fraction: float = 0.0,
    drop_stragglers: bool = False,
    example_dp: ExampleDP | None = None,
    trainable: filters.Filter | None = None,
) -> FederatedAlgorithm:
    """Federated optimization with any client and server optax optimizers.

    Args:
      model: the model to train.
      client_optimizer: an optax transformation, or `round -> transformation` for per-round
        schedules; an optax schedule inside it runs over local steps.
      server_optimizer: applied to the averaged pseudo-gradient; default `optax.sgd(1.0)`
        (FedAvg). Optax schedules in it run over rounds.
      batch_size: examples per local step (see `Batching`); None is one full batch.
      num_epochs: passes over each client's data.
      max_steps: a cap on each client's local steps (None: no cap).
      drop_remainder: drop a client's last, partial batch instead of masking it.
      max_examples_per_client: a larger client uses its first this-many examples.
      shuffle: a fresh permutation of each client's examples every epoch.
      client_weighting: weight clients by example count or uniformly (in the default
        aggregator).
      aggregator: an `fs.aggregators` chain (a single stage is chained); default
        `aggregators.default(client_weighting)`.
      mu: FedProx's proximal coefficient (`fedprox`); 0 is FedAvg.
      straggler_fraction: the chance that a client is a straggler in a round, running
        fewer epochs (see `Batching`).
      drop_stragglers: leave the stragglers' partial work out of the aggregate.
      example_dp: example-level DP-SGD in every local step (`ExampleDP(clip_norm,
        noise_multiplier)`, Abadi et al. 2016), accounted per client by
        `fs.privacy.example_epsilon`; None trains on plain gradients.
      trainable: an `fs.filters` filter of the leaves clients train and send (None: all).
        The client's delta, and so the aggregator chain, its reduction (a DP clip's norm, a
        SecAgg dimension) and the upload, cover those leaves only; the server fills zeros for
        the frozen ones before its optax step and zeroes their updates after it, so they stay
        at their initial values bitwise even under a server weight decay. The mask is
        resolved here, on the model's param shapes (a filter that selects nothing fails
        before anything compiles); `algorithm.trained` is the upload's size
        (`filters.Trained`: parameters and bytes per client).

    Example:
      >>> import optax, fedjax_sim as fs
      >>> model = fs.models.logistic_regression(60, 10)
      >>> algo = fedopt(model, optax.sgd(0.1), optax.adam(0.01), batch_size=10)
    """
    check_model(model)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    check_optimizer(client_optimizer, "client_optimizer", allow_schedule=True)
    check_optimizer(server_optimizer, "server_optimizer")
    aggregator = check_aggregator(aggregator, client_weighting, client_state=True)
    if example_dp is not None and not isinstance(example_dp, ExampleDP):
        raise TypeError(f"example_dp must be fs.algorithms.ExampleDP(clip_norm, "
                        f"noise_multiplier) or None, got {type(example_dp).__name__} "
                        f"{example_dp!r}"[:300])
    trained = None
    if trainable is not None:
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
        trainable = filters.mask(trainable, shapes)
        trained = filters.trained_fraction(shapes, trainable)
        server_optimizer = filters.frozen_updates_zeroed(server_optimizer, trainable)
    update = optimizer_client_update(model, client_optimizer, mu=mu, example_dp=example_dp,
                                     trainable=trainable)

    def init(params, key):
        if trainable is not None:
            filters.mask(trainable, params)  # the params must have the model's structure
        return init_state(params, key, server_optimizer, aggregator,
                          client_optimizer=client_optimizer, hparams={"mu": mu} if mu else None,
                          trainable=trainable)

    def round_fn(state, inputs, client_states, *, engine: Engine):
        result, mean_delta, agg_state, agg_metrics = run_pass(
            update, aggregator, state, inputs, Broadcast.of(state),
            engine=engine, client_states=client_states)
        if trainable is not None:  # a zero pseudo-gradient for the frozen leaves
            frozen = filters.partition(state.params, trainable)[1]
            mean_delta = filters.combine(mean_delta, jax.tree.map(jnp.zeros_like, frozen))
        ok = included(inputs.cohort, result)
        state, updates = server_step(state, mean_delta, server_optimizer, ok.any())
        return (state._replace(agg_state=agg_state), result.states,
                round_metrics(inputs.cohort, result, state, updates, agg_metrics))

    client_state = None
    if aggregator.client_state is not None:  # the update is stateless: its part of a row is ()
        def client_state(params):
            sent = params if trainable is None else filters.partition(params, trainable)[0]
            return ((), aggregator.client_state(sent))

    passes = (Batching(batch_size, num_epochs, max_steps, drop_remainder,
                       max_examples_per_client, shuffle, straggler_fraction, drop_stragglers),)
    return FederatedAlgorithm(init=init, round=round_fn, model=model, passes=passes,
                              aggregator=aggregator, trained=trained, client_state=client_state)


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
