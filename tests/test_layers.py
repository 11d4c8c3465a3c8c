"""`models.layers.Conv` equals `flax.linen.Conv`, with either implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fedjax_sim.models.layers import Conv


@pytest.mark.parametrize("impl", ["slices", "lax"])
@pytest.mark.parametrize("kernel,strides,padding,size", [
    ((3, 3), (1, 1), "VALID", (28, 28)),
    ((3, 3), (1, 1), "SAME", (9, 9)),
    ((3, 3), (2, 2), "SAME", (32, 32)),
    ((3, 3), (2, 2), "SAME", (7, 9)),
    ((1, 1), (2, 2), "SAME", (8, 8)),
    ((2, 3), (1, 2), "VALID", (6, 11)),
    ((3, 3), 2, "SAME", (10, 10)),  # an int stride, as flax.linen.Conv also takes
])
def test_conv_matches_flax_conv(impl, kernel, strides, padding, size):
    x = jax.random.normal(jax.random.key(0), (2, *size, 3))
    ours = Conv(5, kernel, strides, padding, impl=impl)
    params = ours.init(jax.random.key(1), x)
    flax_conv = nn.Conv(5, kernel, strides, padding)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, flax_conv.init(jax.random.key(1), x))
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
    np.testing.assert_allclose(jax.jit(ours.apply)(params, x), jax.jit(flax_conv.apply)(params, x),
                               rtol=1e-5, atol=1e-5)
    # Gradients agree as well (the engine differentiates through it).
    g_ours = jax.jit(jax.grad(lambda p: jnp.sum(ours.apply(p, x) ** 2)))(params)
    g_flax = jax.jit(jax.grad(lambda p: jnp.sum(flax_conv.apply(p, x) ** 2)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours,
                 g_flax)


def test_int_kernel_size_is_square():
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 2))
    params = Conv(4, (3, 3)).init(jax.random.key(1), x)
    np.testing.assert_array_equal(Conv(4, 3).apply(params, x), Conv(4, (3, 3)).apply(params, x))


def test_bad_arguments():
    x = jnp.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError, match="padding"):
        Conv(2, padding="CIRCULAR").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="impl"):
        Conv(2, impl="fft").init(jax.random.key(0), x)
