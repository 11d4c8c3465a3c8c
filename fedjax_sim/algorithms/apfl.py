"""APFL (Deng et al. 2020): each client's model is a mixture alpha v + (1 - alpha) w of a
personal model v and the global model w, with a per-client mixing weight alpha.

Each sampled client takes FedAvg's local steps on its copy w of the global model and, on the
same batches, steps v and (with `adaptive_alpha`) alpha on the loss of the mixture
v_bar = alpha v + (1 - alpha) w, both from one gradient at v_bar, whose w is the copy before
the step (Algorithm 1's v_bar^(t-1); the authors' FedTorch code mixes the w already stepped
and moves alpha once a round):
  w <- w - eta grad F(w)
  v <- v - eta grad_v F(v_bar) = v - eta alpha grad F(v_bar)
  alpha <- clip(alpha - alpha_lr grad_alpha F(v_bar), 0, 1),
    grad_alpha F(v_bar) = <v - w, grad F(v_bar)>.
It sends w's delta (the paper's plain mean of the w, so clients weigh alike by default; any
server optimizer). v and alpha live in the client store: a client starts from v = the global
model of the round it is first sampled in (the paper: w^0) and the given alpha. Personalized
evaluation reports alpha v + (1 - alpha) w with the current global w (the paper's output).

References: Deng, Kamani and Mahdavi, "Adaptive Personalized Federated Learning", 2020
  (arXiv:2003.13461; Algorithm 1 and its adaptive alpha).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms import base
from fedjax_sim.algorithms.fedavg import check_aggregator, delta_round
from fedjax_sim.algorithms.local import (
    local_training,
    personal_broadcast,
    train_metrics,
)
from fedjax_sim.checks import check_bool, check_model, check_number, check_optimizer
from fedjax_sim.data.cohort import Batching
from fedjax_sim.engine import ClientResult, ClientUpdate


def apfl(model, client_optimizer, server_optimizer=None, *, alpha: float,
         adaptive_alpha: bool = False, alpha_lr: float = 0.0, personal_optimizer=None,
         batch_size=10, num_epochs=1, max_steps=None, shuffle=True,
         client_weighting="uniform", aggregator=None) -> base.FederatedAlgorithm:
    """APFL with initial mixing weight `alpha` in [0, 1], moved by SGD at `alpha_lr` when
    `adaptive_alpha`; `personal_optimizer` steps v on grad_v F(v_bar) (default
    `client_optimizer`, eta in the paper's rule); the server optimizer defaults to SGD at 1.
    """
    check_model(model)
    alpha = check_number("alpha", alpha, at_least=0, at_most=1)
    adaptive_alpha = check_bool("adaptive_alpha", adaptive_alpha)
    alpha_lr = check_number("alpha_lr", alpha_lr, at_least=0)
    check_optimizer(client_optimizer, "client_optimizer", allow_schedule=True)
    personal_optimizer = client_optimizer if personal_optimizer is None else personal_optimizer
    check_optimizer(personal_optimizer, "personal_optimizer", allow_schedule=True)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    check_optimizer(server_optimizer, "server_optimizer")
    aggregator = check_aggregator(aggregator, client_weighting)
    init_global, step_global = local_training(model, client_optimizer)
    init_personal, _ = local_training(model, personal_optimizer)  # its state, not its step
    shared = personal_optimizer is client_optimizer  # then its traced values apply to both

    def init(broadcast, ctx):
        v, a = ctx.state
        personal = init_personal(personal_broadcast(broadcast, v, shared), ctx)
        return init_global(broadcast, ctx), personal, a

    def step(local, batch, mask):
        g, p, a = local
        key = jax.random.fold_in(p.key, p.step)  # the model key of the global copy's step

        def mixture_loss(v, a):
            v_bar = jax.tree.map(lambda v, w: a * v + (1 - a) * w, v, g.params)
            total = jnp.sum(jnp.where(mask, model.loss(v_bar, batch, key), 0.0))
            return total / jnp.maximum(jnp.sum(mask), 1), total

        # One backward pass gives both: d/dv = alpha grad F(v_bar), d/dalpha = <v - w, grad>.
        (_, total), (grad_v, grad_a) = jax.value_and_grad(
            mixture_loss, (0, 1), has_aux=True)(p.params, a)
        opt = base.resolve_optimizer(personal_optimizer, p.round)
        updates, opt_state = opt.update(grad_v, p.opt_state, p.params)
        p = p._replace(params=optax.apply_updates(p.params, updates), opt_state=opt_state,
                       step=p.step + 1, loss_sum=p.loss_sum + total,
                       count=p.count + jnp.sum(mask, dtype=p.count.dtype))
        if adaptive_alpha:
            a = jnp.clip(a - alpha_lr * grad_a, 0.0, 1.0)
        return step_global(g, batch, mask), p, a

    def finalize(broadcast, local, ctx):
        g, p, a = local
        metrics = dict(train_metrics(g), personal_loss=train_metrics(p)["train_loss"], alpha=a)
        return ClientResult(base.delta(broadcast.params, g.params), (p.params, a), metrics)

    update = ClientUpdate(init, step, finalize)

    def init_state(params, key):
        return base.init_state(params, key, server_optimizer, aggregator,
                               client_optimizer=client_optimizer)

    passes = (Batching(batch_size, num_epochs, max_steps, shuffle=shuffle),)
    return base.FederatedAlgorithm(
        init=init_state, round=delta_round(update, aggregator, server_optimizer), model=model,
        passes=passes, aggregator=aggregator, personal=_mixture,
        client_state=lambda params: (params, jnp.float32(alpha)))


def _mixture(params, state):
    v, a = state
    return jax.tree.map(lambda v, w: (a * v + (1 - a) * w).astype(w.dtype), v, params)
