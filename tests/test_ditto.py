"""Ditto: the vectorized round against the plain reference (global model and personal
models), the store's untouched rows, lambda's limits, and personalized evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_scaffold import population

import fedjax_sim as fs
from fedjax_sim import client_store
from fedjax_sim.engine import Engine, client_mesh
from fedjax_sim.testing import (
    assert_trees_close,
    check_personal_evaluation,
    check_rounds_against_reference,
    reference_ditto_round,
)

RTOL, ATOL = 1e-5, 1e-6


@pytest.mark.parametrize("chunk, devices", [(1, 1), (3, 1), (1, 8)])
def test_ditto_matches_the_reference_round_after_round(chunk, devices):
    data = population()  # ragged: 1 to 17 examples
    model = fs.models.logistic_regression(5, 3)
    client, personal_opt, lam = optax.sgd(0.1), optax.sgd(0.2, momentum=0.5), 0.3
    server = optax.sgd(0.8)
    algo = fs.algorithms.ditto(model, client, server, lam=lam, personal_optimizer=personal_opt,
                               batch_size=4, num_epochs=2)
    engine = Engine(chunk, client_mesh() if devices == 8 else None)
    params = jax.tree.map(lambda p: p + 0.05, model.init(None))
    check_rounds_against_reference(
        algo, data, params, engine,
        lambda ref, cohort, pool, key: reference_ditto_round(
            model, client, personal_opt, lam, server, *ref, cohort, pool, key,
            cohort.batch_size, data.num_clients),
        (params, server.init(params), {}))


def test_a_huge_lambda_keeps_the_personal_model_at_the_global_one_and_zero_is_local_training():
    data = population()
    model = fs.models.logistic_regression(5, 3)
    params = jax.tree.map(lambda p: p + 0.05, model.init(None))

    def personal_after_one_round(lam, lr):
        algo = fs.algorithms.ditto(model, optax.sgd(0.1), lam=lam,
                                   personal_optimizer=optax.sgd(lr), batch_size=4)
        result = fs.simulate(algo, data, rounds=1, cohort_size=data.num_clients, params=params,
                             chunk_size=2, progress=False)
        return client_store.gather(result.store, jnp.arange(data.num_clients), params)

    # lr lam = 1: each step lands on w - lr grad F(v): within lr |grad| of the global model.
    pulled = personal_after_one_round(1e4, 1e-4)
    for v, w in zip(jax.tree.leaves(pulled), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(v, np.broadcast_to(w, v.shape), atol=1e-3)
    # lam = 0: the personal model is the client's own local SGD, i.e. FedAvg's client model.
    free = personal_after_one_round(0.0, 0.1)
    for cid, local in fs.testing.fedavg_client_models(model, data, params, optax.sgd(0.1),
                                                      4).items():
        assert_trees_close(jax.tree.map(lambda t, cid=cid: t[cid], free), local, RTOL, ATOL,
                           what=f"client {cid}")


def test_personalized_evaluation_reports_each_clients_personal_model():
    train, test = fs.data.synthetic(1.0, 1.0, num_clients=10, seed=0)
    model = fs.models.logistic_regression(60, 10)
    algo = fs.algorithms.ditto(model, optax.sgd(0.05), lam=0.1, batch_size=10)
    result = fs.simulate(algo, train, rounds=3, cohort_size=5, eval_data=test, chunk_size=2,
                         progress=False)
    last = check_personal_evaluation(algo, result, train, test)
    assert last["eval_personal"]["accuracy"]["p50"] > last["eval"]["accuracy"]["p50"]


def test_a_negative_lambda_is_refused():
    model = fs.models.logistic_regression(5, 3)
    with pytest.raises(ValueError, match="lam"):
        fs.algorithms.ditto(model, optax.sgd(0.1), lam=-0.1)
