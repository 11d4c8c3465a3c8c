"""The aggregators against their definitions, computed in float64 with numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.aggregators import UNROLLED_SUM_MAX, mean, weighted_sum


@pytest.mark.parametrize("k", [1, 2, UNROLLED_SUM_MAX, UNROLLED_SUM_MAX + 1, 33])
def test_weighted_sum_is_the_weighted_sum_over_clients(k):
    rng = np.random.default_rng(k)
    w = rng.uniform(0, 3, k).astype(np.float32)
    x = rng.standard_normal((k, 5, 3)).astype(np.float32)
    got = weighted_sum(jnp.asarray(w), jnp.asarray(x))
    assert got.shape == (5, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np.einsum("k,kij->ij", w.astype(np.float64), x), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("k", [2, UNROLLED_SUM_MAX + 1])
def test_weighted_sum_is_not_finite_when_an_input_is_not(k):
    # The engine masks non-finite clients before the sum; the sum itself must not hide one.
    x = np.ones((k, 4), np.float32)
    x[1, 2] = np.nan
    x[0, 0] = np.inf
    got = np.asarray(weighted_sum(jnp.ones(k), jnp.asarray(x)))
    assert np.isnan(got[2]) and np.isinf(got[0]) and np.isfinite(got[[1, 3]]).all()


def test_mean_streams_over_chunks():
    rng = np.random.default_rng(0)
    outputs = {"a": rng.standard_normal((6, 4)).astype(np.float32),
               "b": rng.standard_normal((6,)).astype(np.float32)}
    w = np.array([1, 2, 0, 3, 1, 5], np.float32)
    agg = mean()
    parts = [agg.contribution({n: jnp.asarray(v[s]) for n, v in outputs.items()},
                              jnp.asarray(w[s]), None, ()) for s in (slice(0, 2), slice(2, 6))]
    total = jax.tree.map(jnp.add, *parts)
    got, _ = agg.finalize(total, (), None)
    for n, v in outputs.items():
        np.testing.assert_allclose(got[n], np.tensordot(w, v.astype(np.float64), 1) / w.sum(),
                                   rtol=1e-5, atol=1e-6)
    empty, _ = agg.finalize(agg.contribution({"a": jnp.ones((2, 4))}, jnp.zeros(2), None, ()),
                            (), None)
    np.testing.assert_array_equal(empty["a"], np.zeros(4))

