"""FedNova: normalized averaging against the reference's per-client updates, and by hand."""

import jax
import numpy as np
import optax
import pytest
from test_scaffold import population, quadratic_model

import fedjax_sim as fs
from fedjax_sim.engine import Engine, client_mesh, replicate
from fedjax_sim.testing import reference_round, round_inputs


@pytest.mark.parametrize("momentum, chunk, devices", [(0.0, 1, 1), (0.5, 3, 1), (0.0, 1, 8)])
def test_fednova_normalizes_the_reference_updates(momentum, chunk, devices):
    """Ragged clients take 1 to 9 steps: the aggregate is tau_eff sum_i p_i delta_i / a_i."""
    data = population()
    model = fs.models.logistic_regression(5, 3)
    algo = fs.algorithms.fednova(model, 0.2, momentum=momentum, batch_size=3, num_epochs=2)
    engine = Engine(chunk, client_mesh() if devices == 8 else None)
    params = jax.tree.map(lambda p: p + 0.1, model.init(None))
    state = replicate(algo.init(params, jax.random.key(0)), engine)
    inputs, cohort, pool = round_inputs(algo, data, [0, 1, 3, 4, 6], engine=engine)
    new, _, metrics = jax.jit(lambda s, i: algo.round(s, i, (), engine=engine))(state, inputs)
    sgd = optax.sgd(1.0)
    _, _, ref = reference_round(model, optax.sgd(0.2, momentum=momentum or None), sgd, params,
                                sgd.init(params), cohort, pool,
                                jax.random.fold_in(jax.random.key(0), 0), cohort.batch_size)
    real = np.asarray(cohort.weights) > 0
    tau = np.asarray(cohort.num_steps, np.float64)[real]
    assert len(set(tau.tolist())) > 2  # genuinely heterogeneous local work
    a = tau if not momentum else (tau - momentum * (1 - momentum ** tau) / (1 - momentum)) / (
        1 - momentum)
    p = np.asarray(cohort.num_examples, np.float64)[real]
    p /= p.sum()
    deltas = [d for d, r in zip(ref["delta"], real, strict=True) if r]
    for k in params:
        normalized = sum(pi * np.asarray(d[k], np.float64) / ai
                         for pi, d, ai in zip(p, deltas, a, strict=True))
        expected = np.asarray(params[k]) - (p @ a) * normalized
        np.testing.assert_allclose(new.params[k], expected, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(metrics.server["tau_eff"], p @ a, rtol=1e-6)


def test_fednova_by_hand():
    """Client p (a = 0, one example, 1 step) and client q (a = 4, three examples, 3 steps),
    x = 0, SGD 0.5 full batch: p: y = 0 (its gradient at its optimum is 0), delta 0;
    q: y: 0 -> 2 -> 3 -> 3.5, delta -3.5, normalized -3.5/3. With p_i = (1/4, 3/4):
    tau_eff = 1/4 + 9/4 = 2.5; x = -(2.5 * 3/4 * -3.5/3) = 2.1875. FedAvg: 3/4 * 3.5 = 2.625."""
    data = fs.data.from_arrays(["p", "q", "q", "q"],
                               {"a": np.array([0.0, 4.0, 4.0, 4.0], np.float32)})
    nova = fs.algorithms.fednova(quadratic_model(), 0.5, batch_size=1, shuffle=False)
    avg = fs.algorithms.fedavg(quadratic_model(), optax.sgd(0.5), batch_size=1, shuffle=False)
    run = lambda algo: float(fs.simulate(algo, data, rounds=1, cohort_size=2, chunk_size=1,
                                         progress=False).params["w"])
    # One example per step: q's three steps each see a = 4, the same full-batch gradient.
    assert run(nova) == pytest.approx(2.1875)
    assert run(avg) == pytest.approx(2.625)
