"""Ditto (Li et al. 2021): a global model trained by FedAvg, and a personal model per client
kept near it by a proximal term.

Each sampled client k trains a copy of the global model w as FedAvg does and sends
`w - w_k`; beside it, on the same batches, it trains its personal model
`v_k <- v_k - eta (grad F_k(v_k) + lambda (v_k - w))` and keeps v_k in the client store. The
server aggregates only the global updates. lambda = 0 is local training alone; a large
lambda pulls v_k to the global model. A client's v_k starts from the global model of the
round it is first sampled in (the paper starts every v_k from w^0). Its personal model is
what personalized evaluation reports (`FederatedAlgorithm.personal`).

References: Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
  Personalization", ICML 2021 (Algorithm 1, one personal step per global step).
"""

from __future__ import annotations

import optax

from fedjax_sim.algorithms import base
from fedjax_sim.algorithms.fedavg import check_aggregator, delta_round
from fedjax_sim.algorithms.local import (
    local_training,
    personal_broadcast,
    train_metrics,
)
from fedjax_sim.checks import check_model, check_number, check_optimizer
from fedjax_sim.data.cohort import Batching
from fedjax_sim.engine import ClientResult, ClientUpdate


def ditto(model, client_optimizer, server_optimizer=None, *, lam: float,
          personal_optimizer=None, batch_size=10, num_epochs=1, max_steps=None,
          shuffle=True, client_weighting="num_examples",
          aggregator=None) -> base.FederatedAlgorithm:
    """Ditto with `lam` (lambda >= 0) the personal models' pull toward the global one.

    `personal_optimizer` trains the personal models (default: `client_optimizer`); the server
    optimizer defaults to SGD at 1 (FedAvg's global model).
    """
    check_model(model)
    lam = check_number("lam", lam, at_least=0)
    check_optimizer(client_optimizer, "client_optimizer", allow_schedule=True)
    personal_optimizer = client_optimizer if personal_optimizer is None else personal_optimizer
    check_optimizer(personal_optimizer, "personal_optimizer", allow_schedule=True)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    check_optimizer(server_optimizer, "server_optimizer")
    aggregator = check_aggregator(aggregator, client_weighting)
    init_global, step_global = local_training(model, client_optimizer)
    init_personal, step_personal = local_training(model, personal_optimizer, mu=lam)
    shared = personal_optimizer is client_optimizer  # then its traced values apply to both

    def init(broadcast, ctx):
        personal = init_personal(personal_broadcast(broadcast, ctx.state, shared), ctx)
        if lam:  # the proximal anchor is the global model, not the start
            personal = personal._replace(anchor=broadcast.params)
        return init_global(broadcast, ctx), personal

    def step(local, batch, mask):
        return step_global(local[0], batch, mask), step_personal(local[1], batch, mask)

    def finalize(broadcast, local, ctx):
        g, v = local
        metrics = dict(train_metrics(g), personal_loss=train_metrics(v)["train_loss"])
        return ClientResult(base.delta(broadcast.params, g.params), v.params, metrics)

    update = ClientUpdate(init, step, finalize)

    def init_state(params, key):
        return base.init_state(params, key, server_optimizer, aggregator,
                               client_optimizer=client_optimizer)

    passes = (Batching(batch_size, num_epochs, max_steps, shuffle=shuffle),)
    return base.FederatedAlgorithm(init=init_state, model=model, passes=passes,
                                   round=delta_round(update, aggregator, server_optimizer),
                                   client_state=lambda params: params, aggregator=aggregator,
                                   personal=_personal_model)


def _personal_model(params, state):
    return state
