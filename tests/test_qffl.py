"""q-FFL (q-FedAvg): its update rule against the reference's per-client updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_scaffold import population

import fedjax_sim as fs
from fedjax_sim.engine import Engine, client_mesh, replicate
from fedjax_sim.testing import assert_trees_close, reference_round, round_inputs


def run_round(algo, data, indices, params, engine):
    state = replicate(algo.init(params, jax.random.key(0)), engine)
    inputs, cohort, pool = round_inputs(algo, data, indices, engine=engine)
    new, _, metrics = jax.jit(lambda s, i: algo.round(s, i, (), engine=engine))(state, inputs)
    return new, metrics, cohort, pool


@pytest.mark.parametrize("q, chunk, devices", [(0.5, 1, 1), (2.0, 3, 1), (1.0, 1, 8)])
def test_qffl_follows_q_fedavg(q, chunk, devices):
    """w <- w - sum_k F_k^q dw_k / sum_k (q F_k^(q-1) ||dw_k||^2 + L F_k^q), dw_k = L (w - w_k),
    L = 1 / lr, F_k the client's loss at w, w_k its trained params (the reference's)."""
    data = population()
    model = fs.models.logistic_regression(5, 3)
    lr = 0.2
    algo = fs.algorithms.qffl(model, lr, q, batch_size=3, num_epochs=2)
    engine = Engine(chunk, client_mesh() if devices == 8 else None)
    params = jax.tree.map(lambda p: p + 0.1, model.init(None))
    indices = [0, 2, 3, 5, 6]
    new, metrics, cohort, pool = run_round(algo, data, indices, params, engine)
    sgd = optax.sgd(1.0)
    _, _, ref = reference_round(model, optax.sgd(lr), sgd, params, sgd.init(params), cohort,
                                pool, jax.random.key(0), cohort.batch_size)
    real = np.flatnonzero(np.asarray(cohort.weights) > 0)
    ids = np.asarray(cohort.client_ids)[real]
    losses = [float(jnp.mean(model.loss(params, data.client(int(i)), None))) for i in ids]
    big_l = 1 / lr
    num, den = jax.tree.map(jnp.zeros_like, params), 0.0
    for f, k in zip(losses, real, strict=True):
        dw = jax.tree.map(lambda d: big_l * np.asarray(d, np.float64), ref["delta"][k])
        num = jax.tree.map(lambda n, d, f=f: n + f ** q * d, num, dw)
        den += q * f ** (q - 1) * sum(np.sum(d ** 2) for d in jax.tree.leaves(dw)) + big_l * f ** q
    expected = jax.tree.map(lambda p, n: p - n / den, params, num)
    assert_trees_close(new.params, expected, 2e-5, 1e-6)
    by_id = dict(zip(np.asarray(metrics.clients["client_ids"]).tolist(),
                     np.asarray(metrics.clients["loss_at_w"]).tolist(), strict=True))
    np.testing.assert_allclose([by_id[i] for i in ids], losses, rtol=1e-5)


def test_q_zero_is_fedavg_with_uniform_weights():
    data = population()
    model = fs.models.logistic_regression(5, 3)
    params = jax.tree.map(lambda p: p + 0.1, model.init(None))
    fair, _, _, _ = run_round(fs.algorithms.qffl(model, 0.2, 0.0, batch_size=3), data,
                              [1, 2, 4, 7], params, Engine(2))
    avg, _, _, _ = run_round(fs.algorithms.fedavg(model, optax.sgd(0.2), batch_size=3,
                                                  client_weighting="uniform"), data,
                             [1, 2, 4, 7], params, Engine(2))
    assert_trees_close(fair.params, avg.params, 1e-5, 1e-6)


@pytest.mark.parametrize("q", [-0.5, float("nan")])
def test_qffl_rejects_a_bad_q(q):
    with pytest.raises(ValueError, match="q must be a finite number >= 0"):
        fs.algorithms.qffl(fs.models.logistic_regression(5, 3), 0.1, q)
