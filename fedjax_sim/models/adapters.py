"""Adapters that turn Flax Linen modules, Flax NNX modules and plain functions into `Model`s."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from fedjax_sim.checks import check_sizes
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

    if isinstance(module, type):
        raise TypeError(f"from_linen takes a module instance, e.g. {module.__name__}(...), "
                        f"not the class {module.__name__}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_linen takes a flax.linen.Module, got {type(module).__name__}")
    input_shape = check_sizes("input_shape", input_shape)

    def flag(train):
        return {train_arg: train} if train_arg else {}

    def call(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TypeError as e:
            if train_arg and f"'{train_arg}'" in str(e):
                raise TypeError(f"{type(module).__name__}.__call__ takes no {train_arg!r} "
                                "argument: pass train_arg=None to from_linen (or the name of "
                                "its train/eval flag)") from e
            raise

    def init(key):
        dummy = jnp.zeros((1, *input_shape), jnp.float32)
        variables = call(module.init, {"params": key, "dropout": key}, dummy, **flag(False))
        return variables["params"]

    def apply(params, inputs, *, train, key):
        rngs = {"dropout": key} if train and key is not None else {}
        return call(module.apply, {"params": params}, inputs, rngs=rngs, **flag(train))

    return classifier(init, apply, num_classes, x=x, y=y, input_shape=input_shape)


def from_nnx(module: nnx.Module, num_classes: int, *, x: str = "x", y: str = "y") -> Model:
    """A classifier from an NNX module mapping inputs to logits.

    The module is split once into a static graph and a parameter pytree; the engine treats the
    parameters as a plain pytree and merges them inside the loss (Flax's recommended functional
    pattern for speed, and vmap-friendly). Evaluation and training both call the module as is:
    modules that need their own RNG state (NNX dropout) are not supported here.
    """
    if not isinstance(module, nnx.Module):
        what = f"the class {module.__name__}" if isinstance(module, type) else type(module).__name__
        raise TypeError(f"from_nnx takes an nnx.Module instance (built with its rngs), got {what}")
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
