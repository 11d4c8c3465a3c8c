"""FedProx: the vectorized round against the plain reference, and the proximal rule by hand."""

import jax
import numpy as np
import optax
import pytest
from test_scaffold import population, quadratic_model

import fedjax_sim as fs
from fedjax_sim.engine import Engine, client_mesh, replicate
from fedjax_sim.testing import assert_trees_close, reference_round, round_inputs


@pytest.mark.parametrize("chunk, devices", [(1, 1), (4, 1), (1, 8)])
def test_fedprox_matches_the_reference(chunk, devices):
    data = population()
    model = fs.models.logistic_regression(5, 3)
    client, server = optax.sgd(0.2), optax.sgd(1.0)
    algo = fs.algorithms.fedprox(model, client, server, mu=0.5, batch_size=3, num_epochs=2)
    engine = Engine(chunk, client_mesh() if devices == 8 else None)
    params = jax.tree.map(lambda p: p + 0.1, model.init(None))
    state = replicate(algo.init(params, jax.random.key(0)), engine)
    inputs, cohort, pool = round_inputs(algo, data, [0, 2, 4, 5, 7], engine=engine)
    new, _, _ = jax.jit(lambda s, i: algo.round(s, i, (), engine=engine))(state, inputs)
    expected, _, _ = reference_round(model, client, server, params, server.init(params), cohort,
                                     pool, jax.random.fold_in(jax.random.key(0), 0),
                                     cohort.batch_size, mu=0.5)
    assert_trees_close(new.params, expected, 1e-5, 1e-6)
    plain = fs.algorithms.fedavg(model, client, server, batch_size=3, num_epochs=2)
    fedavg, _, _ = jax.jit(lambda s, i: plain.round(s, i, (), engine=engine))(state, inputs)
    assert not np.allclose(fedavg.params["w"], new.params["w"])  # mu does act


def test_fedprox_follows_the_proximal_rule_by_hand():
    """One client, a = 4, w_t = 0, lr 0.5, mu = 1, two full-batch steps:
    g = (w - a) + mu (w - w_t): w1 = 0 - 0.5 (0 - 4 + 0) = 2; w2 = 2 - 0.5 (2 - 4 + 2) = 2.
    (FedAvg's second step would reach 3.)"""
    data = fs.data.from_arrays(["p"], {"a": np.array([4.0], np.float32)})
    prox = fs.algorithms.fedprox(quadratic_model(), optax.sgd(0.5), mu=1.0, batch_size=None,
                                 num_epochs=2)
    avg = fs.algorithms.fedavg(quadratic_model(), optax.sgd(0.5), batch_size=None,
                               num_epochs=2)
    run = lambda algo: fs.simulate(algo, data, rounds=1, cohort_size=1, chunk_size=1,
                                   progress=False).params["w"]
    assert float(run(prox)) == pytest.approx(2.0)
    assert float(run(avg)) == pytest.approx(3.0)


@pytest.mark.parametrize("mu", [-0.1, float("nan"), "1"])
def test_fedprox_rejects_a_bad_mu(mu):
    with pytest.raises(ValueError, match="mu must be a finite number >= 0"):
        fs.algorithms.fedprox(quadratic_model(), optax.sgd(0.1), mu=mu)
