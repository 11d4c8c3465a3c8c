"""Per-client persistent state (SCAFFOLD's control variates, FedDyn's gradients, personal
heads): a `[num_clients, ...]` table on the device, gathered and scattered by client id with
each round's cohort inside the compiled round.

A client not yet sampled has no row: `gather` gives it the algorithm's initial state, computed
from the current server params, and `scatter` marks its row as written. Padding clients (ids
`>= num_clients`) read the initial state and never write (`mode="drop"`); clients not sampled
are untouched. On a mesh the table is split over the "clients" axis (rows padded to a multiple
of the devices), so each device holds a share of the population's states.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_sim.engine import CLIENTS, Engine


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
    for leaf in jax.tree.leaves(template):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"client_state must return a pytree of arrays, got a leaf of type "
                            f"{type(leaf).__name__}")
    table = jax.tree.map(lambda x: _zeros((rows, *x.shape), x.dtype, engine), template)
    return ClientStore(table, _zeros((rows,), bool, engine))


def _zeros(shape, dtype, engine: Engine) -> jax.Array:
    if engine.mesh is None:
        return jnp.zeros(shape, dtype)
    sharding = NamedSharding(engine.mesh, P(CLIENTS))
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def gather(store: ClientStore, ids: jax.Array, initial: Any) -> Any:
    """The rows of clients `ids` `[C, ...]`; `initial` (one client's initial state) for clients
    never written and for padding clients."""
    known = jnp.take(store.written, ids, mode="fill", fill_value=False)

    def one(table, init):
        rows = jnp.take(table, ids, axis=0, mode="fill", fill_value=0)
        mask = known.reshape((-1,) + (1,) * (rows.ndim - 1))
        return jnp.where(mask, rows, jnp.asarray(init, table.dtype)[None])

    return jax.tree.map(one, store.table, initial)


def scatter(store: ClientStore, ids: jax.Array, rows: Any, num_clients: int) -> ClientStore:
    """The store with clients `ids`' rows replaced by `rows`; ids `>= num_clients` (padding)
    write nothing."""
    ids = jnp.where(ids < num_clients, ids, store.num_rows)  # out of range: dropped
    table = jax.tree.map(lambda t, r: t.at[ids].set(r.astype(t.dtype), mode="drop"),
                         store.table, rows)
    return ClientStore(table, store.written.at[ids].set(True, mode="drop"))


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
