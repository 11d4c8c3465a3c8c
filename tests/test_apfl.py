"""APFL: the vectorized round against the plain reference (global model, personal models and
mixing weights), the store's untouched rows, the paper's rule on a case by hand, alpha's
limits, personalized evaluation of the mixture, and bad arguments."""

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
    reference_apfl_round,
)

RTOL, ATOL = 1e-5, 1e-6


@pytest.mark.parametrize("chunk, devices", [(1, 1), (3, 1), (1, 8)])
def test_apfl_matches_the_reference_round_after_round(chunk, devices):
    data = population()  # ragged: 1 to 17 examples
    model = fs.models.logistic_regression(5, 3)
    client, personal_opt, server = optax.sgd(0.1), optax.sgd(0.2, momentum=0.5), optax.sgd(0.8)
    alpha, alpha_lr = 0.4, 0.3
    algo = fs.algorithms.apfl(model, client, server, alpha=alpha, adaptive_alpha=True,
                              alpha_lr=alpha_lr, personal_optimizer=personal_opt, batch_size=4,
                              num_epochs=2)
    engine = Engine(chunk, client_mesh() if devices == 8 else None)
    params = jax.tree.map(lambda p: p + 0.05, model.init(None))
    _, _, ref = check_rounds_against_reference(
        algo, data, params, engine,
        lambda ref, cohort, pool, key: reference_apfl_round(
            model, client, personal_opt, alpha, alpha_lr, server, *ref, cohort, pool, key,
            cohort.batch_size, data.num_clients),
        (params, server.init(params), {}))
    assert any(float(a) != alpha for _, a in ref[-1].values())  # the adaptive rule moved


def test_apfl_follows_the_papers_rule_on_a_case_by_hand():
    """One client of one example a = 2, f(x) = (x - a)^2 / 2, two full-batch steps of SGD 0.5
    from w = v = 0 (its first round), alpha = 0.5, alpha_lr = 0.4. Each step mixes the w of
    before it: v_bar = alpha v + (1 - alpha) w, g = v_bar - a.
    Step 1: v_bar = 0, g = -2: v <- 0 - 0.5 * 0.5 * (-2) = 0.5; alpha <- 0.5 - 0.4 (v - w) g
    = 0.5 (v = w); w <- 0 - 0.5 (0 - 2) = 1.
    Step 2: v_bar = 0.25 + 0.5 = 0.75, g = -1.25: v <- 0.5 + 0.25 * 1.25 = 0.8125;
    alpha <- 0.5 - 0.4 (0.5 - 1)(-1.25) = 0.25; w <- 1 - 0.5 (1 - 2) = 1.5, the server's.
    Personal: 0.25 * 0.8125 + 0.75 * 1.5 = 1.328125. With alpha_lr = 2, alpha would be
    0.5 - 1.25 < 0: clipped to 0.
    """
    data = fs.data.from_arrays(["p"], {"a": np.array([2.0], np.float32)})

    def one_round(alpha_lr):
        algo = fs.algorithms.apfl(quadratic_model(), optax.sgd(0.5), alpha=0.5,
                                  adaptive_alpha=True, alpha_lr=alpha_lr, batch_size=None,
                                  num_epochs=2, shuffle=False)
        result = fs.simulate(algo, data, rounds=1, cohort_size=1, progress=False)
        v, a = client_store.gather(result.store, jnp.arange(1), algo.client_state(result.params))
        return algo, result.params, {"w": v["w"][0]}, a[0]

    algo, params, v, a = one_round(0.4)
    assert float(params["w"]) == pytest.approx(1.5)
    assert float(v["w"]) == pytest.approx(0.8125)
    assert float(a) == pytest.approx(0.25)
    assert float(algo.personal(params, (v, a))["w"]) == pytest.approx(1.328125)
    assert float(one_round(2.0)[3]) == 0.0


def test_alpha_zero_is_fedavg_with_personal_equal_global_and_alpha_one_is_local_training():
    data = population()
    model = fs.models.logistic_regression(5, 3)
    params = jax.tree.map(lambda p: p + 0.05, model.init(None))
    run = lambda algo, rounds: fs.simulate(algo, data, rounds=rounds, cohort_size=4,
                                           params=params, chunk_size=2, progress=False)
    # alpha = 0, fixed: v_bar = w, so v never moves and the global model is FedAvg's.
    zero = fs.algorithms.apfl(model, optax.sgd(0.1), alpha=0.0, batch_size=4)
    fedavg = fs.algorithms.fedavg(model, optax.sgd(0.1), batch_size=4,
                                  client_weighting="uniform")
    result = run(zero, 3)
    assert_trees_close(result.params, run(fedavg, 3).params, RTOL, ATOL, what="global")
    v, a = client_store.gather(result.store, jnp.arange(data.num_clients), (params, 0.0))
    assert_trees_close(zero.personal(result.params, (jax.tree.map(lambda t: t[0], v), a[0])),
                       result.params, 0, 0, what="personal")
    # alpha = 1, fixed: v_bar = v, so v is the client's own local SGD, i.e. FedAvg's client
    # model in the round it is first sampled.
    one = fs.algorithms.apfl(model, optax.sgd(0.1), alpha=1.0, batch_size=4)
    result = fs.simulate(one, data, rounds=1, cohort_size=data.num_clients, params=params,
                         chunk_size=2, progress=False)
    v, _ = client_store.gather(result.store, jnp.arange(data.num_clients), (params, 1.0))
    for cid, local in fs.testing.fedavg_client_models(model, data, params, optax.sgd(0.1),
                                                      4).items():
        assert_trees_close(jax.tree.map(lambda t, cid=cid: t[cid], v), local, RTOL, ATOL,
                           what=f"client {cid}")


def test_personalized_evaluation_reports_each_clients_mixture():
    train, test = fs.data.synthetic(1.0, 1.0, num_clients=10, seed=0)
    model = fs.models.logistic_regression(60, 10)
    algo = fs.algorithms.apfl(model, optax.sgd(0.05), alpha=0.5, adaptive_alpha=True,
                              alpha_lr=0.05, batch_size=10)
    result = fs.simulate(algo, train, rounds=3, cohort_size=5, eval_data=test, chunk_size=2,
                         progress=False)
    last = check_personal_evaluation(algo, result, train, test)
    assert last["eval_personal"]["accuracy"]["p50"] > last["eval"]["accuracy"]["p50"]


@pytest.mark.parametrize("kwargs, name", [
    (dict(alpha=-0.1), "alpha must be a finite number >= 0 and <= 1"),
    (dict(alpha=1.5), "alpha must be a finite number >= 0 and <= 1"),
    (dict(alpha=0.5, alpha_lr=-1.0), "alpha_lr must be a finite number >= 0"),
])
def test_bad_arguments_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=name):
        fs.algorithms.apfl(fs.models.logistic_regression(5, 3), optax.sgd(0.1), **kwargs)
