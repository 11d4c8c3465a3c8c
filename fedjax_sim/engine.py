"""The client engine: a whole cohort's local training as one compiled program.

Clients run in chunks of K (`Engine.chunk_size`): a `lax.scan` over chunks whose carry holds
the running sum of a streamed aggregation (so memory stays bounded by K clients, not C), a
`vmap` over the K clients of a chunk, and a `lax.while_loop` over each client's local steps
with a runtime trip count (under vmap it runs to the chunk's longest client and leaves
finished lanes exactly as they were). K=1 is a plain scan over clients; K=C is a full vmap. On
many devices the client axis is split over the mesh axis "clients" with `shard_map`, and the
partial sums are summed across devices by XLA (`psum`).

A client sees a `ClientContext` (its id, key, sizes and persistent state) and returns a
`ClientResult` (the output the aggregator gets, its new persistent state, its metrics).
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

from fedjax_sim import client_store
from fedjax_sim.aggregators import Aggregator, Reduced, sum_rows, weighted_sum_rows
from fedjax_sim.data.cohort import Cohort

CLIENTS = "clients"  # the mesh axis the cohort is split over


class ClientContext(NamedTuple):
    """What one client knows of itself in a round.

    Attributes:
      id: i32[], its position in the population (padding clients: `>= num_clients`).
      key: its key for this pass (independent of K, devices and cohort position).
      num_examples: i32[], the distinct examples it trains on this pass.
      num_steps: i32[], the local steps it takes this pass.
      state: its persistent state from the client store; `()` for stateless algorithms.
      slot: i32[], its rank among the pass's participants (the clients of weight > 0, in
        cohort order), -1 for the others; like the key, independent of K and devices.
      participants: i32[], how many clients of the pass have weight > 0.
      cohort_key: the pass's key, the same for every client: randomness the cohort shares
        (secure aggregation's pairwise masks and neighbour graph).
    """

    id: jax.Array
    key: jax.Array
    num_examples: jax.Array
    num_steps: jax.Array
    state: Any = ()
    slot: Any = -1
    participants: Any = 0
    cohort_key: Any = None


class ClientResult(NamedTuple):
    """What a client hands back: `output` to the aggregator, `state` to the client store
    (`()` when stateless), `metrics` a dict of per-client scalars."""

    output: Any = ()
    state: Any = ()
    metrics: dict | None = None


class ClientUpdate(NamedTuple):
    """One client's local work, as three pure functions (vmapped and scanned by the engine).

    Attributes:
      init: `(broadcast, ctx) -> local`; `broadcast` is what the server sends.
      step: `(local, batch, mask) -> local`, one local step on a batch whose padded entries
        have `mask == False`.
      finalize: `(broadcast, local, ctx) -> ClientResult`.
    """

    init: Callable[[Any, ClientContext], Any]
    step: Callable[[Any, dict, jax.Array], Any]
    finalize: Callable[[Any, Any, ClientContext], ClientResult]


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


class PassResult(NamedTuple):
    """One pass of the engine over a cohort.

    Attributes:
      reduced: the aggregator's reduction (`Reduced`: sums, or `[C, ...]` rows); None when no
        aggregator ran.
      metrics: per-client arrays `[C]`: the update's and the aggregator's metrics.
      states: the clients' new persistent states `[C, ...]` (`()` when stateless); a client
        the aggregator excluded as not finite (`metrics["finite"]`) must not be written back,
        and the store's `scatter` drops it.
    """

    reduced: Reduced | None
    metrics: dict[str, jax.Array]
    states: Any


def run_clients(
    update: ClientUpdate,
    cohort: Cohort,
    pool: dict[str, jax.Array],
    broadcast: Any,
    key: jax.Array,
    *,
    engine: Engine,
    aggregator: Aggregator | None = None,
    agg_state: Any = (),
    client_states: Any = (),
) -> PassResult:
    """Runs every client of `cohort` and reduces their outputs (call inside `jax.jit`).

    Client c's key is `fold_in(key, client_ids[c])`: its training key (`ctx.key`) folds in 0,
    the aggregator's per-client key folds in 1. `client_states` are the clients' persistent
    states `[C, ...]`, in cohort order, or a whole store (`client_store.InScan`, one device
    only), gathered and scattered chunk by chunk; then the result's `states` is the new
    `ClientStore`.
    With an aggregator that keeps per-client state (`Aggregator.client_state`), each row is
    the pair (the algorithm's state, the aggregator's row): the update sees the first as
    `ctx.state`, the aggregator's client part the second, and both come back new.
    """
    in_scan = isinstance(client_states, client_store.InScan)
    if in_scan and engine.mesh is not None:
        raise ValueError("a store is gathered inside the engine on one device only: on a mesh "
                         "pass the cohort's rows")
    b = cohort.batch_size
    arange_b = jnp.arange(b, dtype=jnp.int32)
    last = cohort.order.shape[0] - 1
    reduction = None if aggregator is None else aggregator.reduction
    stateful_aggregator = aggregator is not None and aggregator.client_state is not None

    def one_client(bcast, rows, start, length, num_steps, weight, cid, num_examples, slot,
                   state):
        order, pool, participants = rows
        client_key = jax.random.fold_in(key, cid)
        if stateful_aggregator:  # the store row is (the algorithm's, the aggregator's)
            state, agg_row = state
        ctx = ClientContext(cid, jax.random.fold_in(client_key, 0), num_examples, num_steps,
                            state, slot, participants, key)
        local = update.init(bcast, ctx)

        def body(carry):
            s, st = carry
            offset = s * b + arange_b
            idx = order[jnp.minimum(start + offset, last)]
            batch = {k: v[idx] for k, v in pool.items()}
            return s + 1, update.step(st, batch, offset < length)

        _, local = lax.while_loop(lambda c: c[0] < num_steps, body, (jnp.int32(0), local))
        result = update.finalize(bcast, local, ctx)
        metrics = dict(result.metrics or {})
        output, new_state = (), result.state
        if aggregator is not None:
            agg_ctx = ctx._replace(key=jax.random.fold_in(client_key, 1))
            if stateful_aggregator:
                output, weight, agg_metrics, agg_row = aggregator.client(
                    result.output, weight, agg_ctx._replace(state=agg_row), agg_state)
                new_state = (new_state, agg_row)
            else:
                output, weight, agg_metrics = aggregator.client(result.output, weight,
                                                                agg_ctx, agg_state)
            metrics.update(agg_metrics)
        return output, weight, new_state, metrics

    def chunk(bcast, rows, xs):
        if xs[0].shape[0] == 1:
            # K=1: no vmap, so matmuls stay unbatched (faster on XLA:CPU than a batch of one).
            out = one_client(bcast, rows, *jax.tree.map(lambda a: a[0], xs))
            out = jax.tree.map(lambda a: a[None], out)
        else:
            out = jax.vmap(one_client, in_axes=(None, None) + (0,) * 8)(bcast, rows, *xs)
        output, weight, states, metrics = out
        if reduction == "sum":
            wsum = lambda o: weighted_sum_rows(weight, o)
            return Reduced(jax.tree.map(wsum, output), sum_rows(weight)), (metrics, states)
        if reduction == "rows":
            return (), (metrics, states, output, weight)
        return (), (metrics, states)

    def store_chunk(bcast, rows, x, store):
        """A chunk that reads its clients' rows from `store` and writes their new ones."""
        ids = x[4]
        states = client_store.gather_few(store, ids, client_states.initial)
        partial, (metrics, new, *rest) = chunk(bcast, rows, (*x[:7], states))
        store = client_store.scatter_few(store, ids, new, client_states.num_clients,
                                     metrics.get("finite"))
        return partial, (metrics, (), *rest), store

    def local(bcast, rows, *per_client):
        k = engine.chunk_size
        xs = jax.tree.map(lambda a: a.reshape((-1, k) + a.shape[1:]), per_client)
        first = jax.tree.map(lambda a: a[0], xs)
        if in_scan:
            carry_shape = jax.eval_shape(lambda: store_chunk(bcast, rows, first,
                                                             client_states.store)[0])
        else:
            carry_shape = jax.eval_shape(lambda: chunk(bcast, rows, first)[0])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), carry_shape)

        def body(carry, x):
            acc, store = carry
            if in_scan:
                partial, per, store = store_chunk(bcast, rows, x, store)
            else:
                partial, per = chunk(bcast, rows, x)
            return (jax.tree.map(jnp.add, acc, partial), store), per

        store = client_states.store if in_scan else None
        (total, store), per = lax.scan(body, (zeros, store), xs)
        per = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), per)
        if in_scan:
            per = (per[0], store, *per[2:])
        if engine.mesh is not None and reduction == "sum":
            total = lax.psum(total, CLIENTS)
        return total, per

    # The order, the pool and the participant count are explicit (replicated) shard_map
    # inputs: gathering from a closed-over array whose sharding names the Auto mesh fails
    # inside the Manual body.
    participant = cohort.weights > 0
    slots = jnp.where(participant, jnp.cumsum(participant, dtype=jnp.int32) - 1, -1)
    rows = (cohort.order, pool, jnp.sum(participant, dtype=jnp.int32))
    per_client = (cohort.start, cohort.length, cohort.num_steps, cohort.weights,
                  cohort.client_ids, cohort.num_examples, slots,
                  () if in_scan else client_states)
    if engine.mesh is None:
        total, per = local(broadcast, rows, *per_client)
    else:
        clients = jax.tree.map(lambda _: P(CLIENTS), per_client)
        total, per = jax.shard_map(
            local,
            mesh=engine.mesh,
            in_specs=(P(), P(), *clients),
            out_specs=(P(), P(CLIENTS)),
            # Without the varying-axes check the body traces as on one device: user models may
            # scan from constant carries (Flax's nn.RNN) they do not mark varying, and the
            # gradient with respect to the replicated params stays per device (with the check,
            # it would be summed over devices unless the params were cast to varying).
            check_vma=False,
        )(broadcast, rows, *per_client)
    if reduction == "rows":
        metrics, states, output, weight = per
        return PassResult(Reduced(output, weight), metrics, states)
    metrics, states = per
    return PassResult(total if reduction == "sum" else None, metrics, states)


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

    return dataclasses.replace(cohort, **{
        f.name: put(getattr(cohort, f.name), P() if f.name == "order" else P(CLIENTS))
        for f in dataclasses.fields(cohort) if f.name != "batch_size"})


def place_rows(tree: Any, engine: Engine) -> Any:
    """Puts per-client host arrays `[C, ...]` on the device(s), split over the mesh."""
    if engine.mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    sharding = NamedSharding(engine.mesh, P(CLIENTS))

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

    return jax.tree.map(put, tree)


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
