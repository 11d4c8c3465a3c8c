"""Adapters that turn Flax Linen modules, Flax NNX modules and plain functions into `Model`s."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from fedjax_sim.models.core import Model, Params, classifier


def from_linen(
    module: nn.Module,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    train_arg: str | None = "train",
    x: str = "x",
    y: str = "y",
) -> Model:
    """A classifier from a Linen module whose `__call__(inputs, **{train_arg: bool})` gives logits.

    Dropout draws from the `"dropout"` RNG stream, seeded per client and step by the engine.
    Modules with mutable collections (batch norm statistics) are not supported: use group or
    layer norm, as federated models usually do.
    """

    def flag(train):
        return {train_arg: train} if train_arg else {}

    def init(key):
        dummy = jnp.zeros((1, *input_shape), jnp.float32)
        return module.init({"params": key, "dropout": key}, dummy, **flag(False))["params"]

    def apply(params, inputs, *, train, key):
        rngs = {"dropout": key} if train and key is not None else {}
        return module.apply({"params": params}, inputs, rngs=rngs, **flag(train))

    return classifier(init, apply, num_classes, x=x, y=y, input_shape=tuple(input_shape))


def from_nnx(module: nnx.Module, num_classes: int, *, x: str = "x", y: str = "y") -> Model:
    """A classifier from an NNX module mapping inputs to logits.

    The module is split once into a static graph and a parameter pytree; the engine treats the
    parameters as a plain pytree and merges them inside the loss (Flax's recommended functional
    pattern for speed, and vmap-friendly). Evaluation and training both call the module as is:
    modules that need their own RNG state (NNX dropout) are not supported here.
    """
    _, _, other = nnx.split(module, nnx.Param, ...)
    found = [f"{'/'.join(map(str, path))} ({type(v).__name__})"
             for path, v in nnx.to_flat_state(other)]
    if found:
        raise ValueError(
            f"from_nnx supports modules whose state is all nnx.Param; {type(module).__name__} "
            f"also holds {found[:5]}: RNG state (NNX dropout) and batch statistics are not "
            "supported; use from_linen for dropout, and group or layer norm")
    graphdef, params = nnx.split(module)

    def init(key):
        del key  # the module was initialised when it was built
        return params

    def apply(p, inputs, *, train, key):
        del train, key
        return nnx.merge(graphdef, p)(inputs)

    return classifier(init, apply, num_classes, x=x, y=y)


def from_function(
    init: Callable[[jax.Array], Params],
    apply: Callable[[Params, jax.Array], jax.Array],
    num_classes: int,
    *,
    x: str = "x",
    y: str = "y",
) -> Model:
    """A classifier from `init(key) -> params` and `apply(params, inputs) -> logits`."""
    return classifier(init, lambda p, inputs, *, train, key: apply(p, inputs), num_classes,
                      x=x, y=y)
