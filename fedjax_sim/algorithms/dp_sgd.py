"""Example-level DP-SGD inside a client's local steps (cross-silo studies, where each client's
own records are what needs protecting).

Each local step takes the gradient of every example of the batch separately (a `vmap` over
the batch, nested inside the engine's `vmap` over clients), clips each to L2 norm C over all
leaves together, sums the real (unmasked) ones, adds Gaussian noise N(0, (z C)^2 I) and divides
by the batch size B, a fixed denominator (dividing by the number of real examples would
reveal it). The client's optax optimizer then takes the noised gradient as it would the plain
one, and the corrections added after it (FedProx's proximal term) read no data, so they are
post-processing.

Keys: step s of a client draws example i's model key (dropout) from
`split(fold_in(step key, 0), B)[i]` and the noise from `fold_in(step key, 1)`, split once per
leaf in `jax.tree.flatten` order, where the step key is `fold_in(ctx.key, s)` as in plain
local training: the noise depends on neither K nor the device count.

The model's loss must be per example (`Model.loss` is): a loss that mixes examples of a batch
(batch statistics) has no per-example sensitivity, and each example here sees a batch of one.

The guarantee is `fs.privacy.example_epsilon`'s. What a client reports as metrics (its
training loss) is the simulator's diagnostics, outside the guarantee.

References:
  Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (Algorithm 1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_sim.aggregators import gaussian_noise
from fedjax_sim.checks import check_number
from fedjax_sim.models.core import Model


@dataclasses.dataclass(frozen=True)
class ExampleDP:
    """DP-SGD's per-example clip norm C (> 0) and noise multiplier z (>= 0; the noise's
    standard deviation on the batch's sum of clipped gradients is z C).

    Example:
      >>> import optax, fedjax_sim as fs
      >>> algo = fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.1),
      ...                             example_dp=fs.algorithms.ExampleDP(1.0, 1.1))
    """

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self):
        object.__setattr__(self, "clip_norm", check_number("clip_norm", self.clip_norm,
                                                           above=0))
        object.__setattr__(self, "noise_multiplier",
                           check_number("noise_multiplier", self.noise_multiplier, at_least=0))


def example_grads(model: Model, params, batch: dict, key: jax.Array):
    """Per-example losses f32[B] and gradients (each leaf `[B, *leaf.shape]`), example i with
    model key `split(key, B)[i]`."""
    size = jax.tree.leaves(batch)[0].shape[0]

    def one(example, k):
        single = jax.tree.map(lambda v: v[None], example)
        return jax.value_and_grad(lambda p: model.loss(p, single, k)[0])(params)

    return jax.vmap(one)(batch, jax.random.split(key, size))


def clip_examples(grads, mask: jax.Array, clip_norm: float):
    """Each example's gradient scaled to L2 norm at most `clip_norm` (all leaves together),
    and the masked ones zeroed (even a non-finite padded gradient contributes nothing)."""
    leaves = jax.tree.leaves(grads)
    sq = sum(jnp.sum(jnp.square(g.astype(jnp.promote_types(g.dtype, jnp.float32))),
                     axis=tuple(range(1, g.ndim))) for g in leaves)
    norm = jnp.sqrt(sq)
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny))

    def one(g):
        shape = (-1,) + (1,) * (g.ndim - 1)
        keep = mask.reshape(shape)
        return jnp.where(keep, g * scale.reshape(shape).astype(g.dtype), jnp.zeros_like(g))

    return jax.tree.map(one, grads)


def private_gradient(model: Model, params, batch: dict, mask: jax.Array, key: jax.Array,
                     dp: ExampleDP):
    """DP-SGD's gradient of one batch: `(sum_i clip(g_i) + N(0, (z C)^2 I)) / B` over the
    real examples, and the sum of their losses (for the training-loss metric)."""
    size = mask.shape[0]
    losses, grads = example_grads(model, params, batch, jax.random.fold_in(key, 0))
    clipped = clip_examples(grads, mask, dp.clip_norm)
    total = jax.tree.map(lambda g: jnp.sum(g, axis=0), clipped)
    noise = gaussian_noise(jax.random.fold_in(key, 1), total, dp.noise_multiplier * dp.clip_norm)
    return (jax.tree.map(lambda s, n: (s + n) / size, total, noise),
            jnp.sum(jnp.where(mask, losses, 0.0)))
