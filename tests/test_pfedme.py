"""pFedMe: the vectorized round against the plain reference (global model and personalized
models), the store's untouched rows, the paper's rule on a case by hand (the inner solve, the
local update and the server's beta), the proximal point reached, personalized evaluation, and
bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_scaffold import population, quadratic_model

import fedjax_sim as fs
from fedjax_sim import client_store
from fedjax_sim.engine import Engine, client_mesh
from fedjax_sim.testing import (
    assert_trees_close,
    check_personal_evaluation,
    check_rounds_against_reference,
    reference_pfedme_round,
)

RTOL, ATOL = 1e-5, 1e-6


@pytest.mark.parametrize("chunk, devices", [(1, 1), (3, 1), (1, 8)])
def test_pfedme_matches_the_reference_round_after_round(chunk, devices):
    data = population()  # ragged: 1 to 17 examples
    model = fs.models.logistic_regression(5, 3)
    lam, inner_steps, personal_lr, eta, server = 0.5, 3, 0.1, 0.3, optax.sgd(0.7)
    algo = fs.algorithms.pfedme(model, lam=lam, inner_steps=inner_steps,
                                personal_lr=personal_lr, eta=eta, server_optimizer=server,
                                batch_size=4, num_epochs=2)
    engine = Engine(chunk, client_mesh() if devices == 8 else None)
    params = jax.tree.map(lambda p: p + 0.05, model.init(None))
    check_rounds_against_reference(
        algo, data, params, engine,
        lambda ref, cohort, pool, key: reference_pfedme_round(
            model, lam, inner_steps, personal_lr, eta, server, *ref, cohort, pool, key,
            cohort.batch_size, data.num_clients),
        (params, server.init(params), {}))


def test_pfedme_follows_the_papers_rule_on_a_case_by_hand():
    """Two clients of one example each (a = 1 and a = 3), f(x) = (x - a)^2 / 2, w = 0, two
    full-batch local steps, lambda = 1, K = 1 inner step at 0.5 = 1 / (1 + lambda), which
    lands on the proximal point (a + lambda w) / (1 + lambda) exactly, eta = 0.5.
    Client a = 3: theta = 1.5, w <- 0 - 0.5 (0 - 1.5) = 0.75; theta <- 1.5 - 0.5 ((1.5 - 3)
    + (1.5 - 0.75)) = 1.875, w <- 0.75 - 0.5 (0.75 - 1.875) = 1.3125.
    Client a = 1: theta = 0.5, w = 0.25; theta = 0.625, w = 0.4375.
    Server: beta = 1 is the mean, 0.875; beta = 0.5 gives (1 - 0.5) 0 + 0.5 * 0.875.
    """
    data = fs.data.from_arrays(["p", "q"], {"a": np.array([1.0, 3.0], np.float32)})

    def one_round(beta):
        algo = fs.algorithms.pfedme(quadratic_model(), lam=1.0, inner_steps=1,
                                    personal_lr=0.5, eta=0.5,
                                    server_optimizer=optax.sgd(beta), batch_size=None,
                                    num_epochs=2, shuffle=False)
        result = fs.simulate(algo, data, rounds=1, cohort_size=2, chunk_size=2,
                             progress=False)
        theta = client_store.gather(result.store, jnp.arange(2), result.params)
        return float(result.params["w"]), np.asarray(theta["w"])

    params, theta = one_round(1.0)
    assert params == pytest.approx(0.875)
    np.testing.assert_allclose(theta, [0.625, 1.875], rtol=1e-6)
    assert one_round(0.5)[0] == pytest.approx(0.4375)


def test_many_inner_steps_reach_the_proximal_point():
    """One client, one full batch: with K = 300 inner steps, theta satisfies the proximal
    problem's optimality condition grad F(theta) + lambda (theta - w) = 0 at the broadcast w,
    and the server (beta = 1, one client) lands on w - eta lambda (w - theta)."""
    data = population(sizes=(7,))
    model = fs.models.logistic_regression(5, 3)
    params = jax.tree.map(lambda p: p + 0.05, model.init(None))
    lam, eta = 1.0, 0.3
    algo = fs.algorithms.pfedme(model, lam=lam, inner_steps=300, personal_lr=0.2, eta=eta,
                                batch_size=None)
    result = fs.simulate(algo, data, rounds=1, cohort_size=1, params=params, progress=False)
    theta = jax.tree.map(lambda t: t[0], client_store.gather(result.store, jnp.arange(1),
                                                             params))
    batch = data.client(0)
    grad = jax.grad(lambda p: jnp.mean(model.loss(p, batch, None)))(theta)
    stationary = jax.tree.map(lambda g, t, w: g + lam * (t - w), grad, theta, params)
    assert_trees_close(stationary, jax.tree.map(jnp.zeros_like, params), 0, 1e-5,
                       what="optimality")
    assert_trees_close(result.params, jax.tree.map(lambda w, t: w - eta * lam * (w - t),
                                                   params, theta), RTOL, ATOL, what="server")


def test_personalized_evaluation_reports_each_clients_personalized_model():
    train, test = fs.data.synthetic(1.0, 1.0, num_clients=10, seed=0)
    model = fs.models.logistic_regression(60, 10)
    algo = fs.algorithms.pfedme(model, lam=1.0, inner_steps=3, personal_lr=0.05, eta=0.5,
                                batch_size=10)
    result = fs.simulate(algo, train, rounds=3, cohort_size=5, eval_data=test, chunk_size=2,
                         progress=False)
    last = check_personal_evaluation(algo, result, train, test)
    assert last["eval_personal"]["accuracy"]["p50"] > last["eval"]["accuracy"]["p50"]


def test_eta_is_traced_a_vmap_over_two_rates_is_the_two_algorithms():
    data = population()
    model = fs.models.logistic_regression(5, 3)
    params = model.init(None)
    engine = Engine(1)
    make = lambda eta: fs.algorithms.pfedme(model, lam=0.5, inner_steps=2, personal_lr=0.1,
                                            eta=eta, batch_size=4)
    algo = make(0.1)
    inputs, _, _ = fs.testing.round_inputs(algo, data, [1, 2, 4], engine=engine)
    rows = jax.tree.map(lambda p: jnp.zeros((3, *p.shape)), params)
    run = lambda a: lambda st: a.round(st, inputs, rows, engine=engine)[:2]
    states = [fs.algorithms.with_hparams(algo.init(params, jax.random.key(0)),
                                         client={"learning_rate": eta}) for eta in (0.05, 0.4)]
    both = jax.jit(jax.vmap(run(algo)))(jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    for i, eta in enumerate((0.05, 0.4)):
        other = make(eta)
        state, new_rows = jax.jit(run(other))(other.init(params, jax.random.key(0)))
        got = jax.tree.map(lambda x, i=i: x[i], both)
        assert_trees_close(got[0].params, state.params, 1e-6, 1e-7)
        assert_trees_close(got[1], new_rows, 1e-6, 1e-7)
    assert not np.allclose(*jax.tree.leaves(both[0].params)[0])


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(lam=-0.1), ValueError, "lam must be a finite number > 0"),
    (dict(lam=0.0), ValueError, "lam must be a finite number > 0"),
    (dict(inner_steps=0), ValueError, "inner_steps must be >= 1"),
    (dict(inner_steps=2.0), TypeError, "inner_steps must be an integer"),
    (dict(personal_lr=0.0), ValueError, "personal_lr must be a finite number > 0"),
    (dict(eta=-1.0), ValueError, "eta must be a finite number > 0"),
])
def test_bad_arguments_are_refused(kwargs, error, name):
    args = dict(lam=1.0, inner_steps=2, personal_lr=0.1, eta=0.1) | kwargs
    with pytest.raises(error, match=name):
        fs.algorithms.pfedme(fs.models.logistic_regression(5, 3), **args)
