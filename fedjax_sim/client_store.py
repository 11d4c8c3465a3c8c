"""Per-client persistent state (SCAFFOLD's control variates, FedDyn's gradients, personal
heads): a `[num_clients, ...]` table on the device (`ClientStore`), gathered and scattered by
client id with each round's cohort inside the compiled round; or, for a population whose
table does not fit the device, in host memory or memory-mapped files (`HostStore`), whose
cohort rows travel with the round's inputs (`CohortRows`) and come back to be written.

A client not yet sampled has no row: `gather` gives it the algorithm's initial state, computed
from the current server params, and `scatter` marks its row as written. Padding clients (ids
`>= num_clients`) read the initial state and never write (`mode="drop"`); clients not sampled
are untouched. On a mesh the table is split over the "clients" axis (rows padded to a multiple
of the devices), so each device holds a share of the population's states.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

if TYPE_CHECKING:
    from fedjax_sim.engine import Engine



class ClientStore(NamedTuple):
    """Attributes:
    table: the states, each leaf `[rows, ...]` (rows >= num_clients).
    written: bool[rows], whether a client's row holds its state yet.
    """

    table: Any
    written: jax.Array

    @property
    def num_rows(self) -> int:
        return int(self.written.shape[0])


def create(num_clients: int, template: Any, engine: Engine) -> ClientStore:
    """An empty store for `num_clients` clients whose state has `template`'s structure, shapes
    and dtypes (arrays or `jax.ShapeDtypeStruct`s)."""
    rows = -(-num_clients // engine.num_devices) * engine.num_devices
    _check_leaves(template)
    table = jax.tree.map(lambda x: _zeros((rows, *x.shape), x.dtype, engine), template)
    return ClientStore(table, _zeros((rows,), bool, engine))


def _check_leaves(template: Any) -> Any:
    for leaf in jax.tree.leaves(template):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"client_state must return a pytree of arrays, got a leaf of type "
                            f"{type(leaf).__name__}")
    return template


def _zeros(shape, dtype, engine: Engine) -> jax.Array:
    if engine.mesh is None:
        return jnp.zeros(shape, dtype)
    from fedjax_sim.engine import CLIENTS  # the engine imports this module

    sharding = NamedSharding(engine.mesh, P(CLIENTS))
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


class InScan(NamedTuple):
    """A device store handed to the engine whole (one device, no mesh): each chunk of K
    clients gathers its rows inside the engine's scan and scatters its new rows back, so the
    table is read and written once a round, not copied into `[C, ...]` rows and back (which
    made SCAFFOLD's 1,000-client W1 round 2x FedAvg's). `run_clients` returns the written
    store as its `states`.

    Attributes:
      store: the `ClientStore`.
      initial: one client's initial state (for clients never written).
      num_clients: the population's size (ids at or past it are padding).
    """

    store: ClientStore
    initial: Any
    num_clients: int


class CohortRows(NamedTuple):
    """A cohort's rows of a host store, sent with the round's inputs: `rows` `[C, ...]` and
    `known` bool[C] (False: never written, or a padding client)."""

    rows: Any
    known: Any


def fill(rows: CohortRows, initial: Any) -> Any:
    """The cohort's states: its rows, and `initial` (one client's initial state) where a
    client has none yet."""
    def one(r, init):
        mask = rows.known.reshape((-1,) + (1,) * (r.ndim - 1))
        return jnp.where(mask, r, jnp.asarray(init, r.dtype)[None])

    return jax.tree.map(one, rows.rows, initial)


def gather(store: ClientStore, ids: jax.Array, initial: Any) -> Any:
    """The rows of clients `ids` `[C, ...]`; `initial` (one client's initial state) for clients
    never written and for padding clients."""
    known = jnp.take(store.written, ids, mode="fill", fill_value=False)
    rows = jax.tree.map(lambda t: jnp.take(t, ids, axis=0, mode="fill", fill_value=0),
                        store.table)
    return fill(CohortRows(rows, known), initial)


def scatter(store: ClientStore, ids: jax.Array, rows: Any, num_clients: int,
            writes: jax.Array | None = None) -> ClientStore:
    """The store with clients `ids`' rows replaced by `rows`; ids `>= num_clients` (padding),
    and clients whose `writes` is False (excluded as not finite), write nothing."""
    keep = ids < num_clients if writes is None else (ids < num_clients) & writes
    ids = jnp.where(keep, ids, store.num_rows)  # out of range: dropped
    table = jax.tree.map(lambda t, r: t.at[ids].set(r.astype(t.dtype), mode="drop"),
                         store.table, rows)
    return ClientStore(table, store.written.at[ids].set(True, mode="drop"))


def gather_few(store: ClientStore, ids: jax.Array, initial: Any) -> Any:
    """`gather` for a chunk's few ids, one dynamic slice a row: on XLA:CPU that reads a
    chunk of K wide rows about twice as fast as `take`."""
    last = store.num_rows - 1
    known = jnp.take(store.written, ids, mode="fill", fill_value=False)
    rows = jax.tree.map(lambda t: jnp.stack([lax.dynamic_index_in_dim(
        t, jnp.minimum(i, last), keepdims=False) for i in ids]), store.table)
    return fill(CohortRows(rows, known), initial)


def scatter_few(store: ClientStore, ids: jax.Array, rows: Any, num_clients: int,
                writes: jax.Array | None = None) -> ClientStore:
    """`scatter` for a chunk's few ids, one dynamic update a row (on XLA:CPU about twice as
    fast as a scatter of K wide rows). A row that must not be written rewrites what its
    clamped index holds now, so it changes nothing even where that index is a client
    written earlier in the chunk."""
    keep = ids < num_clients if writes is None else (ids < num_clients) & writes
    at = jnp.minimum(ids, store.num_rows - 1)

    def write(t, r):
        for j in range(ids.shape[0]):
            old = lax.dynamic_index_in_dim(t, at[j], keepdims=True)
            new = jnp.where(keep[j], r[j][None].astype(t.dtype), old)
            t = lax.dynamic_update_index_in_dim(t, new, at[j], 0)
        return t

    table = jax.tree.map(write, store.table, rows)
    dropped = jnp.where(keep, ids, store.num_rows)
    return ClientStore(table, store.written.at[dropped].set(True, mode="drop"))


def check_template(template: Any, expected: Any) -> None:
    """Raises unless a client's state `template` has the structure, shapes and dtypes of the
    store's rows, naming the first difference (a client_state init that returns another
    structure than finalize writes back)."""
    a, b = jax.tree.structure(template), jax.tree.structure(expected)
    if a != b:
        raise ValueError(f"client state structure differs from the store's: the algorithm's "
                         f"client_state gives {a}, but its clients return {b}")
    for x, y in zip(jax.tree.leaves(template), jax.tree.leaves(expected), strict=True):
        if tuple(x.shape) != tuple(y.shape) or np.dtype(x.dtype) != np.dtype(y.dtype):
            raise ValueError(f"client state leaf of shape {tuple(y.shape)} and dtype {y.dtype} "
                             f"from the clients does not fit the store's "
                             f"{tuple(x.shape)} {x.dtype} (from client_state)")


class HostStore(NamedTuple):
    """A client store in host memory, or in memory-mapped `.npy` files: for populations whose
    table of states does not fit the device. Each round reads its cohort's rows here
    (`rows`), sends them with the round's inputs and writes the returned rows back (`write`).

    Attributes:
      table: numpy arrays `[num_clients, ...]`, one per leaf of a client's state.
      written: bool[num_clients], whether a client's row holds its state yet.
    """

    table: Any
    written: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.written.shape[0])

    @classmethod
    def create(cls, num_clients: int, template: Any,
               path: str | os.PathLike | None = None) -> HostStore:
        """An empty store (`template` as in `create`); with `path`, its arrays are `.npy` files
        in that directory, memory-mapped (so the table may exceed the host's memory)."""
        leaves, treedef = jax.tree.flatten(_check_leaves(template))
        specs = [((num_clients, *x.shape), np.dtype(x.dtype)) for x in leaves]
        if path is None:
            arrays = [np.zeros(shape, dtype) for shape, dtype in specs]
            written = np.zeros(num_clients, bool)
        else:
            root = Path(path)
            root.mkdir(parents=True, exist_ok=True)
            arrays = [np.lib.format.open_memmap(root / f"leaf_{i}.npy", "w+", dtype, shape)
                      for i, (shape, dtype) in enumerate(specs)]
            written = np.lib.format.open_memmap(root / "written.npy", "w+", bool,
                                                (num_clients,))
        return cls(jax.tree.unflatten(treedef, arrays), written)

    def rows(self, ids: np.ndarray) -> CohortRows:
        """The rows of clients `ids` (host arrays); padding ids (`>= num_rows`) read zeros,
        not known."""
        ids = np.asarray(ids)
        real = ids < self.num_rows
        safe = np.where(real, ids, 0)
        rows = jax.tree.map(lambda t: np.where(real.reshape((-1,) + (1,) * (t.ndim - 1)),
                                               t[safe], 0).astype(t.dtype), self.table)
        return CohortRows(rows, self.written[safe] & real)

    def write(self, ids: np.ndarray, rows: Any) -> None:
        """Writes clients `ids`' rows in place; padding ids write nothing."""
        ids = np.asarray(ids)
        real = ids < self.num_rows
        for table, new in zip(jax.tree.leaves(self.table), jax.tree.leaves(rows), strict=True):
            table[ids[real]] = np.asarray(new)[real]
        self.written[ids[real]] = True

    def load(self, other: Any) -> HostStore:
        """This store with `other`'s contents (a restored checkpoint) copied in place."""
        for table, new in zip(jax.tree.leaves(self.table), jax.tree.leaves(other.table),
                              strict=True):
            table[...] = np.asarray(new)
        self.written[...] = np.asarray(other.written)
        return self
