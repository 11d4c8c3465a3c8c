"""Layers that stay fast inside the engine's loops.

XLA:CPU runs a convolution inside a loop body (a `lax.scan` or `while_loop`, which is where the
engine runs every local step) through a slow path, about 10x slower than the same convolution
outside a loop (jax-ml/jax#12868; measured here: 421 ms against 27 ms per step of the EMNIST
CNN's two convolutions and their gradients). `Conv` computes the same convolution as im2col
from shifted slices and one matmul, which XLA:CPU runs at full speed in loops; on other backends
it calls `lax.conv_general_dilated`, whose kernels are fast there and need no k*k-times larger
patch tensor. Parameters are named and shaped as `flax.linen.Conv`'s ("kernel" [kh, kw, in,
out], "bias" [out]), so the two are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax


def conv_by_slices(x: jax.Array, kernel: jax.Array, strides: Sequence[int]) -> jax.Array:
    """A VALID NHWC x HWIO convolution as im2col from shifted (strided) slices and a matmul."""
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    patches = jnp.concatenate(
        [x[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]
         for i in range(kh) for j in range(kw)], axis=-1)
    return patches @ kernel.reshape(kh * kw * cin, cout)


class Conv(nn.Module):
    """A 2D convolution (NHWC), numerically `flax.linen.Conv` with the same parameters.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw), or one int for both.
      strides: (sh, sw), or one int for both.
      padding: "VALID" or "SAME".
      use_bias: add a bias.
      impl: "auto" (slices on the CPU backend, `lax` elsewhere), "slices" or "lax".
    """

    features: int
    kernel_size: int | Sequence[int] = (3, 3)
    strides: int | Sequence[int] = (1, 1)
    padding: str = "SAME"
    use_bias: bool = True
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = _pair(self.kernel_size)
        strides = _pair(self.strides)
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kh, kw, x.shape[-1], self.features))
        if self.padding == "SAME":
            x = jnp.pad(x, ((0, 0), *_same_padding(x.shape[1:3], (kh, kw), strides),
                            (0, 0)))
        elif self.padding != "VALID":
            raise ValueError(f"padding must be 'SAME' or 'VALID', got {self.padding!r}")
        impl = self.impl
        if impl == "auto":
            impl = "slices" if jax.default_backend() == "cpu" else "lax"
        if impl == "slices":
            y = conv_by_slices(x, kernel, strides)
        elif impl == "lax":
            y = lax.conv_general_dilated(x, kernel, strides, "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            raise ValueError(f"impl must be 'auto', 'slices' or 'lax', got {impl!r}")
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _same_padding(size, kernel, strides):
    """XLA's SAME padding (as `flax.linen.Conv` uses): output ceil(n / s), extra at the end."""
    pads = []
    for n, k, s in zip(size, kernel, strides, strict=True):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads
