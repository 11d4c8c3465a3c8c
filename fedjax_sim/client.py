"""The client engine: a whole cohort's local training as one compiled program.

Clients run in chunks of K (`Engine.chunk_size`): a `lax.scan` over chunks whose carry holds
the running aggregate (so memory stays bounded by K clients, not C), a `vmap` over the K
clients of a chunk, and a `lax.while_loop` over each client's local steps with a runtime trip
count (under vmap it runs to the chunk's longest client and leaves finished lanes exactly as
they were). K=1 is a plain scan over clients; K=C is a full vmap. On many devices the client
axis is split over the mesh axis "clients" with `shard_map`, and the partial aggregates are
summed across devices by XLA (`psum`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_sim.aggregators import Aggregator
from fedjax_sim.data.cohort import Cohort

CLIENTS = "clients"  # the mesh axis the cohort is split over


class ClientUpdate(NamedTuple):
    """One client's local work, as three pure functions (vmapped and scanned by the engine).

    Attributes:
      init: `(broadcast, key) -> local_state`; `broadcast` is what the server sends.
      step: `(local_state, batch, mask) -> local_state`, one local step on a batch whose
        padded entries have `mask == False`.
      finalize: `(broadcast, local_state) -> (output, metrics)`; `output` goes to the
        aggregator, `metrics` is a dict of per-client scalars.
    """

    init: Callable[[Any, jax.Array], Any]
    step: Callable[[Any, dict, jax.Array], Any]
    finalize: Callable[[Any, Any], tuple[Any, dict]]


@dataclasses.dataclass(frozen=True)
class Engine:
    """How a cohort is laid out on the hardware (static: a new value compiles a new program).

    Attributes:
      chunk_size: K, clients trained side by side (vmapped) on each device.
      mesh: a mesh with a "clients" axis to split the cohort over; None for one device.
    """

    chunk_size: int = 1
    mesh: Mesh | None = None

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape[CLIENTS]

    @property
    def cohort_multiple(self) -> int:
        """The padded cohort size must be a multiple of this."""
        return self.num_devices * self.chunk_size


def client_mesh(devices=None) -> Mesh:
    """A one-axis mesh named "clients" over `devices` (default: all), with Auto axis type."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (CLIENTS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


class ClientResults(NamedTuple):
    total: Any  # the aggregator's partial, summed over all clients (and devices)
    metrics: dict[str, jax.Array]  # per-client metrics, [C]
    finite: jax.Array  # bool[C], False where a client's output had a NaN or inf
    norms: jax.Array  # f32[C], the L2 norm of each client's output (NaN where not finite)


def _row_checks(tree, n: int) -> tuple[jax.Array, jax.Array]:
    """(bool[n], f32[n]): whether every value in row i of every leaf is finite, and the L2
    norm of row i over all leaves (what a user sees of a client whose update is far off)."""
    ok = jnp.ones((n,), bool)
    sq = jnp.zeros((n,), jnp.float32)
    for x in jax.tree.leaves(tree):
        rows = x.reshape(n, -1)
        ok &= jnp.all(jnp.isfinite(rows), axis=1)
        sq += jnp.sum(jnp.square(rows.astype(jnp.float32)), axis=1)
    return ok, jnp.where(ok, jnp.sqrt(sq), jnp.nan)


def run_clients(
    update: ClientUpdate,
    aggregator: Aggregator,
    agg_state: Any,
    broadcast: Any,
    cohort: Cohort,
    pool: dict[str, jax.Array],
    key: jax.Array,
    *,
    batch_size: int,
    engine: Engine,
) -> ClientResults:
    """Runs every client of `cohort` and aggregates their outputs (call inside `jax.jit`).

    Client c's randomness is `fold_in(key, client_ids[c])`: independent of K, the device count
    and the client's position in the cohort. A client whose output is not finite gets weight 0
    and a zeroed output, so it cannot poison the aggregate; `finite` reports it, and `norms`
    each output's L2 norm.
    """
    b = batch_size
    arange_b = jnp.arange(b, dtype=jnp.int32)
    last = cohort.order.shape[0] - 1

    def one_client(bcast, rows, start, length, num_steps, client_key):
        order, pool = rows
        state = update.init(bcast, jax.random.fold_in(client_key, 0))

        def body(carry):
            s, st = carry
            offset = s * b + arange_b
            idx = order[jnp.minimum(start + offset, last)]
            batch = {k: v[idx] for k, v in pool.items()}
            return s + 1, update.step(st, batch, offset < length)

        _, state = lax.while_loop(lambda c: c[0] < num_steps, body, (jnp.int32(0), state))
        return update.finalize(bcast, state)

    def chunk(bcast, rows, xs):
        start, length, num_steps, weights, ids = xs
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
        if ids.shape[0] == 1:
            # K=1: no vmap, so matmuls stay unbatched (faster on XLA:CPU than a batch of one).
            out = one_client(bcast, rows, start[0], length[0], num_steps[0], keys[0])
            outputs, metrics = jax.tree.map(lambda a: a[None], out)
        else:
            outputs, metrics = jax.vmap(one_client, in_axes=(None, None, 0, 0, 0, 0))(
                bcast, rows, start, length, num_steps, keys)
        finite, norms = _row_checks(outputs, ids.shape[0])
        weights = jnp.where(finite, weights, 0.0)
        outputs = jax.tree.map(
            lambda o: jnp.where(finite.reshape((-1,) + (1,) * (o.ndim - 1)), o, 0), outputs)
        agg_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        partial = aggregator.contribution(outputs, weights, agg_keys, agg_state)
        return partial, (metrics, finite, norms)

    def local(bcast, rows, start, length, num_steps, weights, ids):
        k = engine.chunk_size
        xs = tuple(a.reshape((-1, k)) for a in (start, length, num_steps, weights, ids))
        partial_shape = jax.eval_shape(lambda: chunk(bcast, rows, tuple(a[0] for a in xs))[0])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), partial_shape)

        def body(acc, x):
            partial, per_client = chunk(bcast, rows, x)
            return jax.tree.map(jnp.add, acc, partial), per_client

        total, (metrics, finite, norms) = lax.scan(body, zeros, xs)
        flat = lambda a: a.reshape((-1,) + a.shape[2:])
        if engine.mesh is not None:
            total = lax.psum(total, CLIENTS)
        return total, jax.tree.map(flat, metrics), flat(finite), flat(norms)

    # The order and the pool are explicit (replicated) shard_map inputs: gathering from a
    # closed-over array whose sharding names the Auto mesh fails inside the Manual body.
    rows = (cohort.order, pool)
    per_client = (cohort.start, cohort.length, cohort.num_steps, cohort.weights,
                  cohort.client_ids)
    if engine.mesh is None:
        total, metrics, finite, norms = local(broadcast, rows, *per_client)
    else:
        total, metrics, finite, norms = jax.shard_map(
            local,
            mesh=engine.mesh,
            in_specs=(P(), P()) + (P(CLIENTS),) * 5,
            out_specs=(P(), P(CLIENTS), P(CLIENTS), P(CLIENTS)),
            # Without the varying-axes check the body traces as on one device: user models may
            # scan from constant carries (Flax's nn.RNN) they do not mark varying, and the
            # gradient with respect to the replicated params stays per device (with the check,
            # it would be summed over devices unless the params were cast to varying).
            check_vma=False,
        )(broadcast, rows, *per_client)
    return ClientResults(total, metrics, finite, norms)


def place_cohort(cohort: Cohort, engine: Engine) -> Cohort:
    """Puts a host cohort on the device(s): per-client arrays split over the mesh.

    Works multi-process too: every process packs the same cohort and supplies its own shards.
    """
    def put(x, spec):
        x = np.asarray(x)
        if engine.mesh is None:
            return jnp.asarray(x)
        sharding = NamedSharding(engine.mesh, spec)
        return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

    return Cohort(*(put(x, P() if name == "order" else P(CLIENTS))
                    for name, x in zip(Cohort._fields, cohort, strict=True)))


def replicate(tree: Any, engine: Engine) -> Any:
    """Puts a host pytree on every device of the engine's mesh (or the default device).

    Multi-process, every process passes the same values and supplies its own devices' copies
    from the host (`jax.device_put` refuses a process-local array for a global sharding, or
    checks it is equal on every process with a collective per leaf); typed PRNG keys travel
    as their raw key data. A global array (a previous round's output) is resharded in place.
    """
    if engine.mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    sharding = NamedSharding(engine.mesh, P())

    def put(x):
        if isinstance(x, jax.Array):
            if jax.process_count() == 1 or not x.is_fully_addressable:
                return jax.device_put(x, sharding)
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                                impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

    return jax.tree.map(put, tree)
