"""Algorithms against their papers' update rules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.algorithms import fedadagrad, fedadam, fedyogi, scale_by_fedopt
from fedjax_sim.testing import round_inputs


def reddi_reference(kind, grads, lr, b1, b2, tau, x0):
    """Algorithm 2 of Reddi et al. (2021) in Delta = -g, written plainly in numpy."""
    x, m, v = x0.copy(), np.zeros_like(x0), np.full_like(x0, tau**2)
    for g in grads:
        delta = -g
        m = b1 * m + (1 - b1) * delta
        if kind == "adagrad":
            v = v + delta**2
        elif kind == "adam":
            v = b2 * v + (1 - b2) * delta**2
        else:
            v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("kind,factory", [("adam", fedadam), ("yogi", fedyogi),
                                          ("adagrad", fedadagrad)])
def test_server_optimizers_follow_reddi_algorithm_2(kind, factory):
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(6, 5)).astype(np.float32) * np.array([1e-3, 0.1, 1, 3, 10],
                                                                  np.float32)
    x0 = rng.normal(size=5).astype(np.float32)
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    opt = factory(lr, b1=b1, tau=tau) if kind == "adagrad" else factory(lr, b1, b2, tau)
    x, state = jnp.asarray(x0), opt.init(jnp.asarray(x0))
    for g in grads:
        updates, state = opt.update(jnp.asarray(g), state, x)
        x = optax.apply_updates(x, updates)
    expected = reddi_reference(kind, grads.astype(np.float64), lr, b1, 0.0 if kind == "adagrad"
                               else b2, tau, x0.astype(np.float64))
    np.testing.assert_allclose(np.asarray(x), expected, rtol=1e-5, atol=1e-6)


def test_scale_by_fedopt_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be"):
        scale_by_fedopt("rmsprop")


def _population(num_clients=6, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 25, num_clients)
    ids = np.repeat(np.arange(num_clients), sizes)
    x = rng.normal(size=(len(ids), 5)).astype(np.float32)
    y = rng.integers(0, 3, len(ids)).astype(np.int32)
    return fs.data.from_arrays(ids.astype(str), {"x": x, "y": y})


def _one_round(algo, data, params, round_num=0, state=None, seed=0):
    engine = fs.Engine(chunk_size=2)
    inputs, _, _ = round_inputs(algo, data, np.arange(data.num_clients), engine=engine,
                                seed=seed, round_num=round_num)
    state = algo.init(params, jax.random.key(round_num)) if state is None else state
    rnd = jax.jit(lambda s, i: algo.round(s, i, (), engine=engine))
    new_state, _, metrics = rnd(state, inputs)
    return new_state, metrics


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_fedavg_server_sgd_1_is_weighted_mean_of_client_params(weighting):
    data = _population()
    model = fs.models.logistic_regression(5, 3)
    params = jax.tree.map(lambda p: p + 0.1, model.init(jax.random.key(0)))
    algo = fs.algorithms.fedavg(model, optax.sgd(0.3), batch_size=4, shuffle=False,
                                client_weighting=weighting)
    # A cohort of one client: the server's new params are that client's trained params.
    alone = [_one_round(algo, data.subset([i]), params)[0].params for i in
             range(data.num_clients)]
    w = data.num_examples.astype(np.float64) if weighting == "num_examples" else \
        np.ones(data.num_clients)
    state, metrics = _one_round(algo, data, params)
    for k in params:
        expected = sum(wi * np.asarray(a[k], np.float64) for wi, a in zip(w, alone, strict=True))
        expected = expected / w.sum()
        np.testing.assert_allclose(state.params[k], expected, rtol=1e-5, atol=1e-6)
    assert int(metrics.num_included) == data.num_clients and int(metrics.num_excluded) == 0


def test_per_round_client_schedule_uses_the_round_number():
    data = _population()
    model = fs.models.logistic_regression(5, 3)
    params = model.init(jax.random.key(0))
    scheduled = fs.algorithms.fedavg(model, lambda r: optax.sgd(0.2 * 0.5 ** r), batch_size=4)
    state0 = scheduled.init(params, jax.random.key(1))
    after_round_1_sched, _ = _one_round(scheduled, data, params, round_num=1,
                                        state=state0._replace(round=jnp.int32(1)))
    constant = fs.algorithms.fedavg(model, optax.sgd(0.1), batch_size=4)
    after_round_1_const, _ = _one_round(constant, data, params, round_num=1)
    np.testing.assert_allclose(after_round_1_sched.params["w"], after_round_1_const.params["w"],
                               rtol=1e-6, atol=1e-7)
    wrong, _ = _one_round(fs.algorithms.fedavg(model, optax.sgd(0.2), batch_size=4), data,
                          params, round_num=1)
    assert not np.allclose(wrong.params["w"], after_round_1_const.params["w"])


def test_fedavgm_is_heavy_ball_momentum_on_the_pseudo_gradient():
    opt = fs.algorithms.fedavgm(0.5, momentum=0.9)
    x, state = jnp.zeros(3), opt.init(jnp.zeros(3))
    g1, g2 = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.5, 0.5, 0.5])
    u1, state = opt.update(g1, state, x)
    u2, state = opt.update(g2, state, x)
    np.testing.assert_allclose(u1, -0.5 * g1, rtol=1e-6)
    np.testing.assert_allclose(u2, -0.5 * (0.9 * g1 + g2), rtol=1e-6)


def test_fedsgd_takes_one_full_batch_step_per_client():
    data = _population()
    model = fs.models.logistic_regression(5, 3)
    algo = fs.algorithms.fedsgd(model, optax.sgd(0.1))
    assert algo.batching.batch_size is None and algo.batching.max_steps == 1
    _, metrics = _one_round(algo, data, model.init(jax.random.key(0)))
    steps = np.asarray(metrics.clients["num_steps"])[np.asarray(metrics.clients["client_ids"])
                                                     < data.num_clients]
    np.testing.assert_array_equal(steps, 1)


def test_client_schedule_runs_over_local_steps_and_restarts_each_round():
    # Learning rate 0.3 for the first local step and 0 after it: the same as one step of 0.3.
    data = _population()
    model = fs.models.logistic_regression(5, 3)
    params = model.init(jax.random.key(0))
    schedule = optax.piecewise_constant_schedule(0.3, {1: 0.0})
    scheduled = fs.algorithms.fedavg(model, optax.sgd(schedule), batch_size=4)
    one_step = fs.algorithms.fedavg(model, optax.sgd(0.3), batch_size=4, max_steps=1)
    many_steps = fs.algorithms.fedavg(model, optax.sgd(0.3), batch_size=4)
    for round_num in (0, 1):  # each round's clients start a fresh optimizer state
        a, _ = _one_round(scheduled, data, params, round_num=round_num)
        b, _ = _one_round(one_step, data, params, round_num=round_num)
        c, _ = _one_round(many_steps, data, params, round_num=round_num)
        np.testing.assert_allclose(a.params["w"], b.params["w"], rtol=1e-6, atol=1e-7)
        assert not np.allclose(a.params["w"], c.params["w"])
