"""`Aggregator`: how client outputs become one server-side aggregate.

An aggregator is streamed: the engine calls `contribution` on each chunk of K clients and adds
the partials up (over chunks in the scan carry, over devices with `psum`), then `finalize`
turns the total into the aggregate. Memory is bounded by K clients, not the cohort. This fits
every aggregator the simulator needs: a weighted mean; central DP (clip per client in
`contribution`, add noise in `finalize`); compression and secure aggregation (encode per
client, decode the sum); and order statistics such as the median, whose contribution scatters
each client into its own row of a [C, ...] buffer so that the sum is the stack of outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Aggregator(NamedTuple):
    """Attributes:
    init: `(template) -> state`, state kept across rounds (e.g. error feedback, noise keys).
    contribution: `(outputs[K, ...], weights f32[K], keys[K], state) -> partial`; partials of
      all chunks and devices are added leaf by leaf. Excluded and padding clients arrive with
      weight 0 and zeroed outputs.
    finalize: `(total, state, key) -> (aggregate, state)`.
    """

    init: Callable[[Any], Any]
    contribution: Callable[[Any, jax.Array, jax.Array, Any], Any]
    finalize: Callable[[Any, Any, jax.Array], tuple[Any, Any]]


class WeightedSum(NamedTuple):
    sum: Any
    weight: jax.Array


UNROLLED_SUM_MAX = 8


def weighted_sum(weights: jax.Array, x: jax.Array) -> jax.Array:
    """`sum_k weights[k] * x[k]` in f32, over the leading (client) axis of `x`.

    Up to `UNROLLED_SUM_MAX` clients it is an elementwise sum, which XLA fuses with the
    engine's masking of non-finite clients into one pass over the outputs: 4-8% of a whole
    round of the 784-200-10 MLP at K = 2 on a 2-core CPU, against a dot over the short client
    axis (a reduction over that axis was 3x slower still). Past that, a dot.
    """
    x = x.astype(jnp.float32)
    if x.shape[0] > UNROLLED_SUM_MAX:
        return jnp.tensordot(weights, x, axes=1)
    total = weights[0] * x[0]
    for k in range(1, x.shape[0]):
        total = total + weights[k] * x[k]
    return total


def mean() -> Aggregator:
    """The weighted mean of client outputs: sum_c w_c o_c / sum_c w_c (zero if all weights are 0).

    Example:
      >>> agg = mean()
      >>> total = agg.contribution(jnp.array([[1.0], [3.0]]), jnp.array([1.0, 3.0]), None, ())
      >>> agg.finalize(total, (), None)[0]
      Array([2.5], dtype=float32)
    """

    def contribution(outputs, weights, keys, state):
        del keys, state
        return WeightedSum(jax.tree.map(lambda o: weighted_sum(weights, o), outputs),
                           jnp.sum(weights))

    def finalize(total, state, key):
        del key
        w = total.weight
        safe = jnp.where(w > 0, w, 1.0)
        return jax.tree.map(lambda s: jnp.where(w > 0, s / safe, 0.0), total.sum), state

    return Aggregator(init=lambda template: (), contribution=contribution, finalize=finalize)
