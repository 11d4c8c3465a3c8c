"""Personalized evaluation (issue 18): fine-tune-then-evaluate and each client's own model
from the client store, against plain per-client loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_evaluation import NUM_CLASSES, NUM_FEATURES, ragged_data, reference

import fedjax_sim as fs
from fedjax_sim import client_store
from fedjax_sim.engine import Engine, client_mesh
from fedjax_sim.evaluation import Evaluator, FineTune
from fedjax_sim.testing import reference_round

TRAIN = (5, 23, 12, 2, 31, 8, 4, 16)  # each evaluation client's own training split (ragged)


@pytest.fixture(scope="module")
def setup():
    model = fs.models.mlp(NUM_FEATURES, NUM_CLASSES, hidden=(8,))
    params = jax.jit(model.init)(jax.random.key(1))
    test = ragged_data()
    # The training population lists the clients in another order, with one more client.
    train = ragged_data(TRAIN + (7,), seed=1).subset([3, 0, 8, 5, 1, 7, 2, 6, 4])
    return model, params, train, test


def tuned_reference(model, params, train, test, tune, evaluator):
    """Each client's k optax steps on its own batches (the fine-tuning pass's cohort, run
    one client and one step at a time by testing.reference_round), then its test metrics."""
    cohort = jax.device_get(evaluator._train_inputs["tune"].cohort)
    server = optax.sgd(1.0)
    _, _, per = reference_round(model, tune.optimizer, server, params, server.init(params),
                                cohort,
                                train.features, jax.random.key(evaluator.seed),
                                tune.batch_size)
    ids = train.client_ids[np.asarray(cohort.client_ids)[:test.num_clients]]
    deltas = per["delta"][:test.num_clients]
    tuned = {cid: jax.tree.map(jnp.subtract, params, d)
             for cid, d in zip(ids, deltas, strict=True)}
    out = {}
    for i, cid in enumerate(test.client_ids):
        one = fs.data.from_client_dict({cid: test.client(i)})
        out[cid] = reference(model, tuned[cid], one)[cid]
    return out, per


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_fine_tuning_equals_k_plain_steps_per_client_then_its_evaluation(setup, chunk_size):
    model, params, train, test = setup
    tune = FineTune(optax.sgd(0.3), steps=6, batch_size=4)
    ev = Evaluator(model, test, train=train, fine_tune=tune, chunk_size=chunk_size,
                   batch_size=5, seed=3)
    got = ev(params)
    expected, per = tuned_reference(model, params, train, test, tune, ev)
    # Clients take min(k, their epochs' steps) steps: here every one takes k.
    np.testing.assert_array_equal(per["num_steps"][:test.num_clients], 6)
    for i, cid in enumerate(got.clients["client_id"]):
        for k in ("loss", "accuracy"):
            np.testing.assert_allclose(got.clients[k][i], expected[cid][k], rtol=2e-5,
                                       atol=1e-6, err_msg=f"{cid} {k}")
    plain = ev(params, personalized=False)
    assert not np.allclose(plain.clients["loss"], got.clients["loss"])  # tuning moved them


def test_zero_steps_is_the_global_evaluation(setup):
    model, params, train, test = setup
    ev = Evaluator(model, test, train=train, fine_tune=FineTune(optax.sgd(0.3), steps=0))
    zero, plain = ev(params), fs.evaluate(model, params, test)
    for k in ("loss", "accuracy"):
        np.testing.assert_array_equal(zero.clients[k], plain.clients[k])


def test_fine_tuning_on_8_devices_equals_one_device(setup):
    model, params, train, test = setup
    tune = FineTune(optax.adam(0.05), steps=3, batch_size=4)
    one = Evaluator(model, test, train=train, fine_tune=tune, chunk_size=2)(params)
    mesh = client_mesh(jax.devices()[:8])
    eight = Evaluator(model, test, train=train, fine_tune=tune, chunk_size=1,
                      engine=Engine(mesh=mesh))(params)
    np.testing.assert_allclose(eight.clients["loss"], one.clients["loss"], rtol=1e-5)


@pytest.mark.parametrize("host", [False, True])
def test_personal_models_come_from_the_store_and_unsampled_clients_get_the_initial(setup,
                                                                                     host):
    """personal(params, row) for the clients whose row is written; client_state(params) for
    the others; the same on a device store and a host store."""
    model, params, train, test = setup
    template = params
    rng = np.random.default_rng(0)
    written = [0, 4, 7]  # training-population positions
    rows = [jax.tree.map(lambda p: p + rng.normal(size=p.shape).astype(p.dtype), params)
            for _ in written]
    stacked = jax.tree.map(lambda *r: np.stack(r), *rows)
    ids = np.array(written, np.int32)
    if host:
        store = client_store.HostStore.create(train.num_clients, template)
        store.write(ids, stacked)
    else:
        store = client_store.create(train.num_clients, template, Engine())
        store = client_store.scatter(store, jnp.asarray(ids), stacked, train.num_clients)
    half = lambda p: jax.tree.map(lambda x: 0.5 * x, p)
    personal = lambda p, row: jax.tree.map(lambda a, b: a + b, half(p), half(row))
    ev = Evaluator(model, test, train=train, personal=personal,
                   client_state=lambda p: jax.tree.map(jnp.zeros_like, p))
    got = ev(params, store)
    for i, cid in enumerate(got.clients["client_id"]):
        j = int(train.index_of([cid])[0])
        row = rows[written.index(j)] if j in written else jax.tree.map(jnp.zeros_like, params)
        one = fs.data.from_client_dict({cid: test.client(int(test.index_of([cid])[0]))})
        expected = reference(model, personal(params, row), one)[cid]
        np.testing.assert_allclose(got.clients["loss"][i], expected["loss"], rtol=2e-5,
                                   err_msg=cid)


def test_bad_personalized_evaluations_are_named(setup):
    model, params, train, test = setup
    with pytest.raises(ValueError, match="steps .* must be an integer >= 0"):
        Evaluator(model, test, train=train, fine_tune=FineTune(optax.sgd(0.1), steps=-1))
    with pytest.raises(ValueError, match="need train="):
        Evaluator(model, test, fine_tune=FineTune(optax.sgd(0.1), steps=2))
    with pytest.raises(ValueError, match="have no training split"):
        Evaluator(model, test, train=train.subset([0, 1]),
                  fine_tune=FineTune(optax.sgd(0.1), steps=2))
    with pytest.raises(TypeError, match="FineTune"):
        Evaluator(model, test, train=train, fine_tune=(optax.sgd(0.1), 2))
    ev = Evaluator(model, test, train=train, personal=lambda p, s: s,
                   client_state=lambda p: p)
    with pytest.raises(ValueError, match="pass the client store"):
        ev(params)


def test_a_simulation_reports_fine_tuned_clients_beside_the_global_model():
    train, test = fs.data.synthetic(1.0, 1.0, num_clients=12, seed=0)
    model = fs.models.logistic_regression(60, 10)
    algo = fs.algorithms.fedavg(model, optax.sgd(0.05), batch_size=10)
    tune = FineTune(optax.sgd(0.05), steps=5)
    result = fs.simulate(algo, train, rounds=2, cohort_size=4, eval_data=test,
                         fine_tune=tune, chunk_size=2, progress=False)
    last = result.history[-1]
    ev = Evaluator(model, test, train=train, fine_tune=tune)
    expected = ev(result.params)
    np.testing.assert_allclose(last["eval_personal_clients"]["accuracy"],
                               expected.clients["accuracy"])
    np.testing.assert_allclose(last["eval_clients"]["accuracy"],
                               fs.evaluate(model, result.params, test).clients["accuracy"])
    assert last["eval_personal"]["accuracy"]["mean"] != last["eval"]["accuracy"]["mean"]
    with pytest.raises(ValueError, match="fine_tune needs eval_data"):
        fs.Simulation(algo, train, cohort_size=4, fine_tune=tune)
