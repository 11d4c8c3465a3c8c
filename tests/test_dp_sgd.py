"""Example-level DP-SGD in the local steps against its definition (Abadi et al. 2016): per-example
gradients of logistic regression by hand in numpy, the noise's distribution, the engine
against the per-example reference loop, and the accounting against dp-accounting and the
Gaussian mechanism's exact curve."""

import itertools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_sim as fs
from fedjax_sim import privacy
from fedjax_sim.algorithms.dp_sgd import ExampleDP, clip_examples, example_grads, private_gradient
from fedjax_sim.data.cohort import Batching
from fedjax_sim.engine import replicate
from fedjax_sim.testing import reference_round, round_inputs

MODEL = fs.models.logistic_regression(4, 3)


def _batch(size=6, real=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, 4)).astype(np.float32) * np.array([3, 1, 0.2, 2], np.float32)
    y = rng.integers(0, 3, size).astype(np.int32)
    x[real:] = np.nan  # padded rows: must contribute nothing, even when not finite
    return {"x": x, "y": y}, np.arange(size) < real


def _params(seed=1):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(4, 3)).astype(np.float32) * 0.5,
            "b": rng.normal(size=(3,)).astype(np.float32) * 0.5}


def _numpy_example_grads(params, batch):
    """d/dW, d/db of softmax cross-entropy of x W + b, one example at a time: x (p - e_y)^T
    and p - e_y."""
    grads = []
    for x, y in zip(batch["x"].astype(np.float64), batch["y"], strict=True):
        logits = x @ params["w"].astype(np.float64) + params["b"]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        p[y] -= 1
        grads.append({"w": np.outer(x, p), "b": p})
    return grads


def test_per_example_clipping_matches_a_plain_loop_and_bounds_every_norm():
    params, (batch, mask) = _params(), _batch()
    c = 1.5
    _, grads = example_grads(MODEL, params, batch, jax.random.key(0))
    clipped = clip_examples(grads, jnp.asarray(mask), c)
    expected = _numpy_example_grads(params, batch)
    norms = [np.sqrt(np.sum(g["w"] ** 2) + np.sum(g["b"] ** 2)) for g in expected]
    assert 0 < sum(n > c for n in norms[:4]) < 4  # some real examples clipped, some not
    for i, g in enumerate(expected):
        for k in params:
            want = min(1.0, c / norms[i]) * g[k] if mask[i] else np.zeros_like(g[k])
            np.testing.assert_allclose(clipped[k][i], want, rtol=1e-5, atol=1e-6)
        got = np.sqrt(sum(np.sum(np.asarray(clipped[k][i], np.float64) ** 2) for k in params))
        assert got <= c * (1 + 1e-6)
    no_noise, loss_sum = private_gradient(MODEL, params, batch, jnp.asarray(mask),
                                          jax.random.key(0), ExampleDP(c, 0.0))
    for k in params:  # the sum over the real examples, over the batch size 6 (not 4)
        total = sum(min(1.0, c / norms[i]) * expected[i][k] for i in range(4))
        np.testing.assert_allclose(no_noise[k], total / 6, rtol=1e-5, atol=1e-6)
    assert np.isfinite(float(loss_sum))


def test_the_noise_is_gaussian_of_stddev_z_c_over_the_batch_size():
    """With every example masked the gradient is the noise alone: over 4,010 coordinates
    times B it is N(0, (z C)^2) (Kolmogorov-Smirnov), each leaf its own draw, and another
    step key gives another draw."""
    model = fs.models.logistic_regression(400, 10)
    params = model.init(None)
    batch = {"x": np.zeros((5, 400), np.float32), "y": np.zeros(5, np.int32)}
    mask = jnp.zeros(5, bool)
    z, c = 1.7, 0.3
    grads, _ = private_gradient(model, params, batch, mask, jax.random.key(3), ExampleDP(c, z))
    noise = np.concatenate([np.ravel(grads["w"]), np.ravel(grads["b"])]) * 5
    assert stats.kstest(noise / (z * c), "norm").pvalue > 0.01
    assert abs(noise.std() / (z * c) - 1) < 0.05
    other, _ = private_gradient(model, params, batch, mask, jax.random.key(4), ExampleDP(c, z))
    assert abs(np.corrcoef(np.ravel(grads["w"]), np.ravel(other["w"]))[0, 1]) < 0.06
    assert not np.allclose(np.asarray(grads["b"]), np.asarray(grads["w"])[0])


def _population():
    rng = np.random.default_rng(1)
    sizes = [5, 9, 4, 12, 7, 6, 10, 3]
    clients = {f"c{i}": {"x": (rng.normal(size=(s, 4)) * [3, 1, 0.2, 2]).astype(np.float32),
                         "y": rng.integers(0, 3, s).astype(np.int32)}
               for i, s in enumerate(sizes)}
    return fs.data.from_client_dict(clients)


def _round(dp, chunk, mesh, **batching):
    data = _population()
    params = jax.tree.map(jnp.asarray, _params())
    algo = fs.algorithms.fedavg(MODEL, optax.sgd(0.3), example_dp=dp, **batching)
    engine = fs.Engine(chunk, fs.client_mesh() if mesh else None)
    inputs, cohort, pool = round_inputs(algo, data, np.arange(8), engine=engine)
    state = replicate(algo.init(params, jax.random.key(0)), engine)
    new, _, metrics = jax.jit(lambda s, i: algo.round(s, i, (), engine=engine))(state, inputs)
    return params, new, cohort, pool


@pytest.fixture(scope="module")
def reference():
    """The per-example reference round (layout-free: computed once)."""
    dp = ExampleDP(0.5, 1.0)
    params, _, cohort, pool = _round(dp, 1, False, batch_size=4, num_epochs=2)
    sgd = optax.sgd(1.0)
    new, _, _ = reference_round(MODEL, optax.sgd(0.3), sgd, params, sgd.init(params), cohort,
                                pool, jax.random.fold_in(jax.random.key(0), 0),
                                cohort.batch_size, example_dp=dp)
    return dp, new


@pytest.mark.parametrize("chunk, mesh", [pytest.param(1, False, marks=pytest.mark.slow),
                                         (3, False), (1, True)])
def test_the_engine_matches_the_per_example_reference(reference, chunk, mesh):
    """Clipped and noised, two epochs of batches of 4 (partial batches among them), K = 1,
    K = 3 and 8 devices: the same params as the reference's loop over examples, the noise
    included."""
    dp, expected = reference
    params, new, _, _ = _round(dp, chunk, mesh, batch_size=4, num_epochs=2)
    for k in params:
        np.testing.assert_allclose(new.params[k], expected[k], rtol=2e-5, atol=2e-6)
        assert not np.allclose(new.params[k], params[k])


def test_no_noise_and_a_clip_above_every_norm_is_plain_local_sgd():
    """Full batches only (drop_remainder), so the fixed denominator is the plain mean's."""
    params, plain, _, _ = _round(None, 2, False, batch_size=3, drop_remainder=True)
    private = _round(ExampleDP(1e6, 0.0), 2, False, batch_size=3, drop_remainder=True)[1]
    for k in params:
        np.testing.assert_allclose(private.params[k], plain.params[k], rtol=1e-5, atol=1e-6)
        assert not np.allclose(plain.params[k], params[k])


def test_bad_input_is_refused_at_construction():
    for clip in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="clip_norm must be a finite number > 0"):
            ExampleDP(clip, 1.0)
    for z in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
            ExampleDP(1.0, z)
    with pytest.raises(TypeError, match="example_dp must be fs.algorithms.ExampleDP"):
        fs.algorithms.fedavg(MODEL, optax.sgd(0.1), example_dp=(1.0, 1.0))


def _brute_force_sum_of_squares(n, batching, b):
    """The largest sum over batches of (times one example is in it)^2, over every position
    the example can take in each epoch of the layout."""
    length = int(batching.steps_and_length(np.array([n]), b)[1][0])
    epochs = -(-length // n)
    best = 0
    for positions in itertools.product(range(n), repeat=epochs):
        at = [e * n + p for e, p in enumerate(positions) if e * n + p < length]
        counts = np.bincount([a // b for a in at])
        best = max(best, int(np.sum(counts ** 2)))
    return best


@pytest.mark.parametrize("n, b, batching", [
    (6, 3, Batching(3, 3)), (5, 2, Batching(2, 4)), (5, 3, Batching(3, 3)),
    (2, 5, Batching(5, 4)), (4, 3, Batching(3, 3, max_steps=3)),
    (5, 2, Batching(2, 3, drop_remainder=True)), (7, 3, Batching(3, 1)),
    (6, 4, Batching(4, 3, max_examples_per_client=5)),
])
def test_worst_case_batches_is_the_worst_arrangement_of_the_shuffles(n, b, batching):
    counts = privacy.worst_case_batches(n, batching)
    used = int(batching.examples_used(np.array([n]))[0])
    assert sum(k * k for k in counts) == _brute_force_sum_of_squares(used, batching, b)


def _phi(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))  # erfc: no cancellation in the far left tail


def _exact_gaussian_epsilon(mu, delta):
    """The epsilon of mu-GDP at delta (Dong, Roth and Su 2022, Corollary 2.13), by bisection
    on delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        d = _phi(-mid / mu + mu / 2) - math.exp(mid) * _phi(-mid / mu - mu / 2)
        lo, hi = (mid, hi) if d > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("n, batching, per_round", [
    (8, Batching(4, 3), 3),  # aligned epochs: each example in one batch per epoch
    (10, Batching(4, 3), 4 + 1),  # a batch spans two epochs: once twice, once once
])
def test_example_epsilon_is_dp_accountings_gaussian_of_sensitivity_2c(n, batching, per_round):
    z, rounds, delta = 3.0, 4, 1e-6
    eps = privacy.example_epsilon(z, batching, n, rounds, delta)
    mu = 2 / z * math.sqrt(per_round * rounds)  # sum of k^2 over the batches, every round
    exact = _exact_gaussian_epsilon(mu, delta)
    assert exact <= eps <= exact * 1.01
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1 / mu))
    np.testing.assert_allclose(eps, acc.get_epsilon(delta), rtol=1e-3)
    if per_round == 3:  # dp-accounting's own replace-one relation: noise over C, doubled
        replace = dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
        replace.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z),
                                                          3 * rounds))
        np.testing.assert_allclose(eps, replace.get_epsilon(delta), rtol=1e-6)
    assert privacy.example_epsilon(z, batching, n, rounds, delta, accountant="rdp") >= eps


def test_example_epsilon_per_client():
    batching = Batching(4, 2)
    got = privacy.example_epsilon(3.0, batching, np.array([8, 9, 3, 8]), np.array([2, 2, 5, 0]),
                                  1e-5)
    assert got.shape == (4,) and got[3] == 0.0  # never took part
    assert got[1] > got[0]  # 9 examples: a batch spans the two epochs
    np.testing.assert_allclose(got[0], privacy.example_epsilon(3.0, batching, 8, 2, 1e-5))
    assert np.isinf(privacy.example_epsilon(0.0, batching, 8, 1, 1e-5))
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
        privacy.example_epsilon(-1.0, batching, 8, 1, 1e-5)
    with pytest.raises(ValueError, match="delta must be"):
        privacy.example_epsilon(1.0, batching, 8, 1, 0.0)
    with pytest.raises(ValueError, match="pass batch_size="):
        privacy.example_epsilon(1.0, Batching(None), 8, 1, 1e-5)
    full = privacy.example_epsilon(3.0, Batching(None, 3), 8, 1, 1e-5, batch_size=20)
    # one full batch of 20 holds epochs 0-2 of 8 examples (24 entries, two batches): the
    # first batch meets all three epochs
    exact = _exact_gaussian_epsilon(2 / 3 * math.sqrt(9), 1e-5)
    assert exact <= full <= exact * 1.01


def test_fedprox_with_dp_sgd_adds_the_proximal_gradient_to_the_noised_one(reference):
    (dp, without), mu = reference, 0.5
    params, new, cohort, pool = _round(dp, 2, False, batch_size=4, num_epochs=2, mu=mu)
    sgd = optax.sgd(1.0)
    expected, _, _ = reference_round(MODEL, optax.sgd(0.3), sgd, params, sgd.init(params),
                                     cohort, pool, jax.random.fold_in(jax.random.key(0), 0),
                                     cohort.batch_size, example_dp=dp, mu=mu)
    for k in params:
        np.testing.assert_allclose(new.params[k], expected[k], rtol=2e-5, atol=2e-6)
        assert not np.allclose(expected[k], without[k], atol=1e-4)
