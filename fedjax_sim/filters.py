"""Partial-model training: which leaves of the params clients train and send.

A filter is one of:
  - a pytree of bools with the params' structure, or a prefix of it
    (`{"Dense_0": False, "Dense_1": True}` covers each layer's kernel and bias);
  - a string: a regular expression searched in each leaf's '/'-joined path ("Dense_1",
    "kernel$"); it must match some leaf;
  - a predicate `(path: str, leaf) -> bool` (`lambda path, _: path.startswith("Dense_1")`);
    it should read only the leaf's shape and dtype (`fedopt` resolves the mask on
    `jax.ShapeDtypeStruct`s);
  - a Flax NNX filter object (`nnx.PathContains("l2")`, `nnx.OfType(nnx.Param)`, `nnx.Any`,
    ...) or a Variable type (`nnx.Param`), called as NNX calls it: with the path as a tuple
    of key names and, for params that are an `nnx.State`, the `nnx.Variable` holding the
    leaf;
  - a tuple or list of these: a leaf any of them selects.

`mask` resolves a filter to a pytree of bools (static: it decides the program's shapes);
`partition` splits params into (trainable, frozen) with `None` in the other's places, the
equinox pattern: None is an empty pytree node, so `jax.tree.map` over either half skips the
holes and an optax optimizer over the trainable half keeps state for those leaves only.
`with_base` loads a trained base model into a larger one (LoRA adapters around it).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Filter = Any  # a bool pytree, str, predicate, NNX filter, or a tuple/list of them


def _name(key) -> str:
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _entries(params) -> list[tuple[tuple[str, ...], Any, Any]]:
    """(path parts, leaf, node) per leaf in `jax.tree.leaves` order; the node is the
    `nnx.Variable` holding the leaf (what NNX filters read), else the leaf itself."""
    nodes = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    leaves = jax.tree.leaves(params)
    if len(nodes) != len(leaves):
        raise TypeError("filters need one array per nnx.Variable in the params")
    return [(tuple(_name(k) for k in path), leaf, node)
            for (path, node), leaf in zip(nodes, leaves, strict=True)]


def _is_nnx_filter(f) -> bool:
    return type(f).__module__ == "flax.nnx.filterlib"


def _selects(f, entries) -> list[bool]:
    """One bool per leaf for a single (non-tuple) filter."""
    if isinstance(f, type):  # a Variable type, as NNX reads it: nnx.Param
        f = nnx.OfType(f)
    if isinstance(f, str):
        pattern = re.compile(f)
        return [bool(pattern.search("/".join(parts))) for parts, _, _ in entries]
    if _is_nnx_filter(f):
        out = [f(parts, node) for parts, _, node in entries]
    else:
        out = [f("/".join(parts), leaf) for parts, leaf, _ in entries]
    for result in out:
        if not isinstance(result, (bool, np.bool_)):  # a traced bool cannot decide shapes
            raise TypeError(f"the filter {f!r} returned {type(result).__name__}, not a Python "
                            "bool: it must decide from the path, shape and dtype alone")
    return [bool(r) for r in out]


def _top_level(entries) -> list[str]:
    return sorted({parts[0] if parts else "<root>" for parts, _, _ in entries})


def _from_filters(parts, entries) -> list[bool]:
    """The union of the filters in `parts`, one bool per leaf."""
    columns = []
    for f in parts:
        column = _selects(f, entries)
        if isinstance(f, str) and not any(column):  # most likely a misspelt layer name
            raise ValueError(f"the filter {f!r} matches no parameter path; the top-level paths "
                             f"are {_top_level(entries)} (paths are '/'-joined, e.g. "
                             f"{'/'.join(entries[0][0])!r})")
        columns.append(column)
    return [any(row) for row in zip(*columns, strict=True)]


def _from_pytree(tree, params) -> list[bool]:
    def expand(m, sub):  # a bool at a prefix covers its whole subtree
        if not isinstance(m, (bool, np.bool_)):
            raise TypeError(f"a mask's leaves must be bools, got {type(m).__name__} {m!r}"[:200])
        return jax.tree.map(lambda _: bool(m), sub)

    try:
        full = jax.tree.map(expand, tree, params)
    except ValueError as e:
        raise ValueError(f"the mask's structure is not the params' (or a prefix of it):\n  "
                         f"mask:   {jax.tree.structure(tree)}\n  params: "
                         f"{jax.tree.structure(params)}") from e
    return jax.tree.leaves(full)


def _is_filter_list(f) -> bool:
    return isinstance(f, (tuple, list)) and len(f) > 0 and all(
        isinstance(x, str) or callable(x) for x in f)


def mask(filter: Filter, params) -> Any:
    """The pytree of Python bools, with the params' structure, that `filter` selects.

    Raises:
      ValueError: the filter selects no leaf ("selects nothing trainable"), a string filter
        matches no path (naming the top-level paths), or a mask pytree has another structure.
      TypeError: a filter of no known kind, or a predicate that returns a non-bool.
    """
    entries = _entries(params)
    if isinstance(filter, str) or callable(filter):
        selected = _from_filters([filter], entries)
    elif _is_filter_list(filter):
        selected = _from_filters(filter, entries)
    else:
        selected = _from_pytree(filter, params)
    if not any(selected):
        raise ValueError(f"the filter {filter!r} selects nothing trainable (the top-level "
                         f"paths are {_top_level(entries)})"[:500])
    return jax.tree.unflatten(jax.tree.structure(params), selected)


def partition(params, mask) -> tuple[Any, Any]:
    """`(trainable, frozen)`: the params with None in place of the frozen leaves, and with
    None in place of the trainable ones."""
    trainable = jax.tree.map(lambda m, p: p if m else None, mask, params)
    frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
    return trainable, frozen


def combine(trainable, frozen) -> Any:
    """The whole params again: each leaf from whichever half holds it."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                        is_leaf=lambda x: x is None)


def with_base(params, base) -> Any:
    """`params` with every leaf that `base` has at the same '/'-joined path replaced by
    base's: a trained base model loaded into one that adds leaves of its own (LoRA's
    adapters, `causal_transformer(lora_rank=...)`), which keep their values.

    Raises:
      ValueError: a base leaf has no place in `params`, or another shape or dtype there (a
        base of another architecture would otherwise be loaded in part, silently).
    """
    leaves = {"/".join(parts): leaf for parts, leaf, _ in _entries(base)}
    entries = _entries(params)
    missing = sorted(set(leaves) - {"/".join(parts) for parts, _, _ in entries})
    if missing:
        raise ValueError(f"{len(missing)} base leaves have no place in the params, e.g. "
                         f"{missing[:3]}; the params' top-level paths are "
                         f"{_top_level(entries)}")
    out = []
    for parts, leaf, _ in entries:
        new = leaves.get("/".join(parts), leaf)
        if (np.shape(new), jnp.result_type(new)) != (np.shape(leaf), jnp.result_type(leaf)):
            raise ValueError(f"the base leaf {'/'.join(parts)!r} is {jnp.result_type(new)}"
                             f"{list(np.shape(new))}, the params' "
                             f"{jnp.result_type(leaf)}{list(np.shape(leaf))}")
        out.append(new)
    return jax.tree.unflatten(jax.tree.structure(params), out)


class Trained(NamedTuple):
    """The size of the trained part: parameters and bytes (in the leaves' dtypes, what a
    client sends before any encoding of the aggregator chain), and of the whole params."""

    params: int
    bytes: int
    total_params: int
    total_bytes: int

    @property
    def fraction(self) -> float:
        """The fraction of the parameters trained."""
        return self.params / self.total_params


def trained_fraction(params, mask) -> Trained:
    """How much of `params` (arrays or `jax.ShapeDtypeStruct`s) the `mask` trains."""
    sizes = [(int(np.prod(x.shape)), int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize, m)
             for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True)]
    return Trained(sum(n for n, _, m in sizes if m), sum(b for _, b, m in sizes if m),
                   sum(n for n, _, _ in sizes), sum(b for _, b, _ in sizes))


def frozen_updates_zeroed(optimizer: optax.GradientTransformation,
                          mask) -> optax.GradientTransformation:
    """`optimizer` with the frozen leaves' updates set to zero, so they never move: a zero
    gradient alone would not stop a weight decay (or any parameter-dependent term). The state
    is the optimizer's own."""
    def update(grads, state, params=None):
        updates, state = optimizer.update(grads, state, params)
        return jax.tree.map(lambda m, u: u if m else jnp.zeros_like(u), mask,
                            updates), state

    return optax.GradientTransformation(optimizer.init, update)

