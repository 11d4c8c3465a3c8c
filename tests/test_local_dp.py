"""Local DP (`aggregators.local_dp`) against its definition: each client's clipped output plus
N(0, (z C)^2 I) from its own key, the same under every layout, and its accounting against
dp-accounting and the Gaussian mechanism's exact curve."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats
from test_aggregators import fedavg_round
from test_dp_sgd import _exact_gaussian_epsilon

from fedjax_sim import aggregators as agg
from fedjax_sim import privacy
from fedjax_sim.aggregators import Reduced, sum_rows, weighted_sum_rows
from fedjax_sim.engine import ClientContext
from fedjax_sim.testing import reference_round


def _ctx(key, cid=0):
    return ClientContext(jnp.int32(cid), key, jnp.int32(1), jnp.int32(1))


def test_each_client_adds_gaussian_noise_of_stddev_z_c_to_its_clipped_output():
    z, c = 1.3, 0.5
    stage = agg.local_dp(z, c)
    zero = {"a": jnp.zeros(3000), "b": jnp.zeros((10, 100))}
    out, weight, metrics = stage.client(zero, jnp.float32(1.0), _ctx(jax.random.key(1)), ())
    noise = np.concatenate([np.ravel(out["a"]), np.ravel(out["b"])])
    assert stats.kstest(noise / (z * c), "norm").pvalue > 0.01
    assert abs(noise.std() / (z * c) - 1) < 0.05 and float(weight) == 1.0
    again, _, _ = stage.client(zero, jnp.float32(1.0), _ctx(jax.random.key(1)), ())
    np.testing.assert_array_equal(out["a"], again["a"])  # the client's key decides it
    other, _, _ = stage.client(zero, jnp.float32(1.0), _ctx(jax.random.key(2)), ())
    for k in zero:  # another client: independent noise (correlation within 4 / sqrt(n))
        r = np.corrcoef(np.ravel(out[k]), np.ravel(other[k]))[0, 1]
        assert abs(r) < 4 / math.sqrt(out[k].size)
    assert abs(np.corrcoef(np.ravel(out["a"])[:1000], np.ravel(out["b"])[:1000])[0, 1]) < 0.13
    big = {"a": jnp.full(3000, 1.0), "b": jnp.zeros((10, 100))}  # norm 54.8: clipped to 0.5
    clean, _, metrics = agg.local_dp(0.0, c).client(big, jnp.float32(1.0),
                                                    _ctx(jax.random.key(1)), ())
    assert bool(metrics["clipped"])
    np.testing.assert_allclose(clean["a"], np.full(3000, c / math.sqrt(3000)), rtol=1e-5)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_the_servers_mean_of_noised_updates_is_unbiased(scale):
    """4,000 clients with one update v, each noised from its own key: the server's mean is
    clip(v) within 4 standard errors in every coordinate (v's norm is scale * C)."""
    z, c, n = 2.0, 1.0, 4000
    v = {"w": jnp.asarray([0.6, -0.8, 0.0]) * scale * c}
    chain = agg.chain(agg.local_dp(z, c), agg.weight_by("uniform"), agg.mean())
    state = chain.init(v)
    out, w, _ = jax.vmap(lambda k: chain.client(v, jnp.float32(1.0), _ctx(k), state))(
        jax.random.split(jax.random.key(5), n))
    reduced = Reduced(jax.tree.map(lambda o: weighted_sum_rows(w, o), out), sum_rows(w))
    value, _, _ = chain.server(reduced, state, jax.random.key(0))
    clipped = np.asarray(v["w"]) * min(1.0, 1 / scale)
    assert np.all(np.abs(np.asarray(value["w"]) - clipped) < 4 * z * c / math.sqrt(n))


@pytest.mark.parametrize("chunk, mesh", [pytest.param(1, False, marks=pytest.mark.slow),
                                         (3, False), (1, True)])
def test_under_the_engine_the_server_averages_each_clients_clipped_update_and_its_own_noise(
        chunk, mesh):
    """K = 1, K = 3 and 8 devices: the server moves by the mean of clip(delta_c) + noise_c,
    the deltas from the plain reference, the noise drawn by hand from each client's key
    (fold_in(fold_in(fold_in(round key, 0), id), 1), then local_dp's salt): the same noise
    whatever the layout."""
    z, c = 0.7, 0.4
    chain = agg.chain(agg.local_dp(z, c), agg.weight_by("uniform"), agg.mean())
    model, params, new, metrics, cohort, pool = fedavg_round(chain, chunk, mesh)
    round_key = jax.random.fold_in(jax.random.key(0), 0)
    sgd = optax.sgd(1.0)
    _, _, ref = reference_round(model, optax.sgd(0.3), sgd, params, sgd.init(params), cohort,
                                pool, round_key, cohort.batch_size)
    total = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
    clipped = []
    for delta, cid in zip(ref["delta"][:8], np.asarray(cohort.client_ids)[:8], strict=True):
        norm = math.sqrt(sum(np.sum(np.square(np.asarray(d, np.float64)))
                             for d in jax.tree.leaves(delta)))
        clipped.append(norm > c)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(round_key, 0), int(cid)),
                                 1)
        leaves, treedef = jax.tree.flatten(delta)
        keys = jax.random.split(jax.random.fold_in(key, agg._LOCAL_DP_SALT), len(leaves))
        noise = jax.tree.unflatten(treedef, [np.asarray(jax.random.normal(k, x.shape), np.float64)
                                             for k, x in zip(keys, leaves, strict=True)])
        scale = min(1.0, c / norm)
        total = jax.tree.map(lambda t, d, e, s=scale: t + s * np.asarray(d) + z * c * e, total,
                             delta, noise)
    assert 0 < sum(clipped) < 8
    np.testing.assert_array_equal(np.asarray(metrics.clients["clipped"])[:8], clipped)
    for k in params:
        np.testing.assert_allclose(new.params[k], params[k] - total[k] / 8, rtol=1e-5,
                                   atol=1e-6)


def _phi(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


@pytest.mark.parametrize("z, participations", [(2.0, 10), (5.0, 3)])
def test_local_epsilon_is_the_gaussian_mechanism_of_sensitivity_2c_over_the_participations(
        z, participations):
    delta = 1e-5
    eps = privacy.local_epsilon(z, participations, delta)
    exact = _exact_gaussian_epsilon(2 * math.sqrt(participations) / z, delta)
    assert exact <= eps <= exact * 1.01
    direct = dp_accounting.pld.PLDAccountant()
    direct.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z / 2),
                                                     participations))
    assert eps == direct.get_epsilon(delta)
    replace = dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
    replace.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z),
                                                      participations))
    np.testing.assert_allclose(eps, replace.get_epsilon(delta), rtol=1e-6)
    assert privacy.local_epsilon(z, participations, delta, accountant="rdp") >= eps
    assert privacy.local_event(z, participations) == dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(z / 2), participations)


def test_bad_input_is_refused():
    assert privacy.local_epsilon(1.0, 0, 1e-5) == 0.0
    assert math.isinf(privacy.local_epsilon(0.0, 3, 1e-5))
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
        agg.local_dp(-0.5, 1.0)
    for clip in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="clip_norm must be a finite number > 0"):
            agg.local_dp(1.0, clip)
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
        privacy.local_epsilon(-1.0, 3, 1e-5)
    with pytest.raises(ValueError, match="participations must be >= 0"):
        privacy.local_epsilon(1.0, -1, 1e-5)
    with pytest.raises(TypeError, match="participations must be an integer"):
        privacy.local_epsilon(1.0, 2.5, 1e-5)
    with pytest.raises(ValueError, match="delta must be"):
        privacy.local_epsilon(1.0, 3, 1.5)
    assert agg.chain(agg.local_dp(1.0, 1.0), agg.mean()).privacy is None  # not the Ledger's
