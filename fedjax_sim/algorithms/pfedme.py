"""pFedMe (Dinh et al. 2020): each client's personalized model is the proximal point of the
global model under its own loss (the Moreau envelope's), and the global model follows them.

For each local step on a batch, a sampled client approximately solves
theta = argmin F(theta; batch) + lambda/2 ||theta - w||^2, w its local copy of the global
model, by K gradient steps theta <- theta - personal_lr (grad F(theta) + lambda (theta - w)),
then moves w <- w - eta lambda (w - theta). Each inner solve starts from the previous step's
theta, the first from the global model (the paper leaves the start open; the authors' code
does this). The client sends w's delta; server SGD at beta on the mean delta is exactly the
paper's w <- (1 - beta) w + beta mean(w_k) (the default, beta = 1, is the mean), and clients
weigh alike by default as in its 1/S mean. The last theta, the client's personalized model,
goes to the client store; personalized evaluation reports it. The training loss reported is
theta's on each batch before its inner solve.

References: Dinh, Tran and Nguyen, "Personalized Federated Learning with Moreau Envelopes",
  NeurIPS 2020 (Algorithm 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms import base
from fedjax_sim.algorithms.fedavg import check_aggregator, delta_round
from fedjax_sim.algorithms.local import local_training, train_metrics
from fedjax_sim.checks import check_integer, check_model, check_number, check_optimizer
from fedjax_sim.data.cohort import Batching
from fedjax_sim.engine import ClientResult, ClientUpdate


def pfedme(model, *, lam: float, inner_steps: int, personal_lr: float, eta: float,
           server_optimizer=None, batch_size=10, num_epochs=1, max_steps=None, shuffle=True,
           client_weighting="uniform", aggregator=None) -> base.FederatedAlgorithm:
    """pFedMe with `lam` (lambda > 0) the pull between personalized and global models,
    `inner_steps` (K) steps at `personal_lr` per inner solve and `eta` the local copy's
    rate (traced: `hparams["client"]["learning_rate"]`); the server optimizer defaults to
    SGD at 1 (`optax.sgd(beta)` is the paper's beta).
    """
    check_model(model)
    lam = check_number("lam", lam, above=0)
    inner_steps = check_integer("inner_steps", inner_steps, 1)
    personal_lr = check_number("personal_lr", personal_lr, above=0)
    eta = check_number("eta", eta, above=0)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    check_optimizer(server_optimizer, "server_optimizer")
    aggregator = check_aggregator(aggregator, client_weighting)
    client_sgd = base.injected_sgd(eta)  # on the envelope's gradient lambda (w - theta)
    init_local, _ = local_training(model, client_sgd)  # its state, not its step

    def init(broadcast, ctx):
        return init_local(broadcast, ctx), broadcast.params

    def step(local, batch, mask):
        w, theta = local
        key = jax.random.fold_in(w.key, w.step)

        def prox_step(theta):
            def loss(p):
                total = jnp.sum(jnp.where(mask, model.loss(p, batch, key), 0.0))
                return total / jnp.maximum(jnp.sum(mask), 1), total

            (_, total), grad = jax.value_and_grad(loss, has_aux=True)(theta)
            return jax.tree.map(lambda t, g, x: t - personal_lr * (g + lam * (t - x)),
                                theta, grad, w.params), total

        theta, total = prox_step(theta)
        theta = jax.lax.fori_loop(1, inner_steps, lambda _, t: prox_step(t)[0], theta)
        envelope_grad = jax.tree.map(lambda x, t: lam * (x - t), w.params, theta)
        updates, opt_state = client_sgd.update(envelope_grad, w.opt_state, w.params)
        return w._replace(params=optax.apply_updates(w.params, updates), opt_state=opt_state,
                          step=w.step + 1, loss_sum=w.loss_sum + total,
                          count=w.count + jnp.sum(mask, dtype=w.count.dtype)), theta

    def finalize(broadcast, local, ctx):
        w, theta = local
        return ClientResult(base.delta(broadcast.params, w.params), theta, train_metrics(w))

    update = ClientUpdate(init, step, finalize)

    def init_state(params, key):
        return base.init_state(params, key, server_optimizer, aggregator,
                               client_optimizer=client_sgd)

    passes = (Batching(batch_size, num_epochs, max_steps, shuffle=shuffle),)
    return base.FederatedAlgorithm(init=init_state, model=model, passes=passes,
                                   round=delta_round(update, aggregator, server_optimizer),
                                   client_state=lambda params: params, aggregator=aggregator,
                                   personal=_personalized_model)


def _personalized_model(params, state):
    return state
