"""`Model`: what the simulator needs of a model, as pure functions.

A model enters as a per-example loss plus per-example metrics. The library owns every
reduction over a batch, so padded examples never reach user code's reductions: a loss returns
one value per example and the engine masks and averages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.checks import check_integer

Params = Any
Batch = dict[str, jax.Array]


class InputSpec(NamedTuple):
    """What a model reads of a batch, so the data can be checked before anything compiles.

    Attributes:
      feature: the feature's name.
      shape: one example's shape (the data's number of values per example must match), or
        None.
      num_ids: for token ids, the vocabulary size (ids must be integers in [0, num_ids)),
        or None.
    """

    feature: str
    shape: tuple[int, ...] | None = None
    num_ids: int | None = None


class Model(NamedTuple):
    """A model as pure functions.

    Attributes:
      init: `(key) -> params`.
      loss: `(params, batch, key) -> f32[B]`, the per-example training loss (dropout on).
      metrics: `(params, batch) -> {name: f32[B] | (f32[B], f32[B])}`, per-example evaluation
        metrics (dropout off); must include "loss". A pair is (numerator, denominator), for
        metrics averaged over something other than examples (next-token accuracy over the
        valid tokens of each sequence): evaluation sums both and divides.
      label: `(feature name, number of classes)` for label range checks, or None.
      inputs: an `InputSpec` of the input feature, for checks of the data's shape or token
        ids before anything compiles, or None.
    """

    init: Callable[[jax.Array], Params]
    loss: Callable[[Params, Batch, jax.Array], jax.Array]
    metrics: Callable[[Params, Batch], dict[str, jax.Array]]
    label: tuple[str, int] | None = None
    inputs: InputSpec | None = None


ApplyFn = Callable[..., jax.Array]  # (params, x, *, train: bool, key) -> logits


def classifier(
    init: Callable[[jax.Array], Params],
    apply: ApplyFn,
    num_classes: int,
    *,
    x: str = "x",
    y: str = "y",
    input_shape: tuple[int, ...] | None = None,
) -> Model:
    """A softmax classifier from `apply(params, inputs, train=..., key=...) -> logits`.

    Loss is softmax cross-entropy; metrics are loss and accuracy. `input_shape`, where
    known, is one example's shape of `x` (`Model.inputs`).
    """

    check_integer("num_classes", num_classes, 2)

    def logits_of(params, inputs, train, key):
        logits = apply(params, inputs, train=train, key=key)
        if logits.shape[-1] != num_classes:  # a label past the logits would give a NaN loss
            raise ValueError(f"the model gives {logits.shape[-1]} logits per example but is "
                             f"a classifier of {num_classes} classes")
        return logits

    def loss(params, batch, key):
        logits = logits_of(params, batch[x], True, key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[y])

    def metrics(params, batch):
        logits = logits_of(params, batch[x], False, None)
        labels = batch[y]
        return {
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels),
            "accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32),
        }

    inputs = None if input_shape is None else InputSpec(x, tuple(input_shape))
    return Model(init=init, loss=loss, metrics=metrics, label=(y, num_classes), inputs=inputs)
