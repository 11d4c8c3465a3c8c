"""Agnostic FedAvg: domain-weighted averaging and projected ascent on the domain weights."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.algorithms.agnostic import project_simplex
from fedjax_sim.engine import Engine, client_mesh, replicate
from fedjax_sim.testing import reference_round, round_inputs


def domains_population(num_domains=2, seed=0):
    rng = np.random.default_rng(seed)
    clients = {}
    for i, n in enumerate([5, 9, 4, 12, 7, 6, 10, 3]):
        clients[f"c{i}"] = {"x": rng.normal(size=(n, 5)).astype(np.float32),
                            "y": rng.integers(0, 3, n).astype(np.int32),
                            "domain": np.full(n, i % num_domains, np.int32)}
    return fs.data.from_client_dict(clients)


@pytest.mark.parametrize("chunk, devices", [(1, 1), (3, 1), (1, 8)])
def test_agnostic_fedavg_mixes_domain_means_and_ascends_on_their_losses(chunk, devices):
    data = domains_population()
    model = fs.models.logistic_regression(5, 3)
    algo = fs.algorithms.agnostic_fedavg(model, optax.sgd(0.2), 2, domain_lr=0.5,
                                         batch_size=3)
    engine = Engine(chunk, client_mesh() if devices == 8 else None)
    params = jax.tree.map(lambda p: p + 0.1, model.init(None))
    state = replicate(algo.init(params, jax.random.key(0)), engine)
    inputs, cohort, pool = round_inputs(algo, data, [0, 1, 2, 3, 5], engine=engine)
    new, _, metrics = jax.jit(lambda s, i: algo.round(s, i, (), engine=engine))(state, inputs)
    sgd = optax.sgd(1.0)
    _, _, ref = reference_round(model, optax.sgd(0.2), sgd, params, sgd.init(params), cohort,
                                pool, jax.random.key(0), cohort.batch_size)
    real = np.flatnonzero(np.asarray(cohort.weights) > 0)
    ids = np.asarray(cohort.client_ids)[real]
    dom = ids % 2
    n = np.asarray(cohort.num_examples, np.float64)[real]
    losses = np.asarray(ref["train_loss"], np.float64)[real]
    for k in params:
        d = np.stack([np.asarray(ref["delta"][i][k], np.float64) for i in real])
        means = [np.tensordot(n[dom == j], d[dom == j], 1) / n[dom == j].sum() for j in (0, 1)]
        np.testing.assert_allclose(new.params[k], params[k] - 0.5 * (means[0] + means[1]),
                                   rtol=2e-5, atol=1e-6)
    domain_loss = np.array([np.sum(n[dom == j] * losses[dom == j]) / n[dom == j].sum()
                            for j in (0, 1)])
    expected = np.asarray(project_simplex(jax.numpy.asarray(0.5 + 0.5 * domain_loss)))
    np.testing.assert_allclose(new.extra, expected, rtol=1e-5, atol=1e-6)
    assert float(metrics.server["lambda_0"]) == pytest.approx(float(expected[0]), rel=1e-5)


def test_project_simplex():
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.normal(size=5) * 3
        p = np.asarray(project_simplex(jax.numpy.asarray(v, jax.numpy.float32)))
        assert p.min() >= 0 and p.sum() == pytest.approx(1.0, abs=1e-5)
        # Optimality (KKT): the support shares one shift t, with v - t <= 0 off it.
        t = (v - p)[p > 0]
        assert np.allclose(t, t[0], atol=1e-5) and np.all(v[p == 0] - t[0] <= 1e-5)
    x = np.array([0.2, 0.3, 0.5], np.float32)
    np.testing.assert_allclose(project_simplex(jax.numpy.asarray(x)), x, atol=1e-6)


def test_the_domain_column_is_checked_before_training():
    model = fs.models.logistic_regression(5, 3)
    algo = fs.algorithms.agnostic_fedavg(model, optax.sgd(0.1), 2)
    no_domain = domains_population().map(lambda f: {"x": f["x"], "y": f["y"]})
    with pytest.raises(ValueError, match="data has no domain feature 'domain'"):
        fs.simulate(algo, no_domain, rounds=1, cohort_size=2, chunk_size=1, progress=False)
    with pytest.raises(ValueError, match=r"domain ids out of range: feature 'domain'.*the "
                       r"algorithm has 2 domain ids"):
        fs.simulate(algo, domains_population(num_domains=3), rounds=1, cohort_size=2,
                    chunk_size=1, progress=False)
