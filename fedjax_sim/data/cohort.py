"""Cohort packing (host side, numpy): from a population and the sampled clients to a `Cohort`.

A `Cohort` holds no feature data. It is an `order` of example rows (client after client, each
client's epochs back to back, every epoch a fresh permutation) plus per-client `start`,
`length` and `num_steps`. Inside the compiled round, step s of a client reads rows
`order[start + s*B : start + (s+1)*B]` of a *pool* of examples and masks the entries past
`length`. The pool is either the whole population, resident on the device (nothing but the
small `order` crosses from the host each round), or the round's clients' rows gathered on the
host. Every array has a fixed shape for a given population, batching and cohort size, so every
round reuses one compiled program whatever the sizes of the sampled clients.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from fedjax_sim.checks import check_bool, check_integer
from fedjax_sim.data.federated import FederatedData, rows_of


@functools.partial(jax.tree_util.register_dataclass, meta_fields=["batch_size"],
                   data_fields=["order", "start", "length", "num_steps", "num_examples",
                                "weights", "client_ids"])
@dataclasses.dataclass(frozen=True)
class Cohort:
    """One round's clients for one pass, sorted by step count and padded to a fixed size.

    A pytree whose `batch_size` is static (part of the compiled program's shape).

    Attributes:
      order: i32[L], pool rows, client after client.
      start: i32[C], where each client's rows begin in `order`.
      length: i32[C], how many entries of `order` the client consumes this round.
      num_steps: i32[C], local steps (`ceil(length / B)`, or floor with drop_remainder).
      num_examples: i32[C], distinct examples the client trains on (after any cap).
      weights: f32[C], 1 for a client that takes a step, 0 for padding clients and clients
        with no step (the aggregator's stages weigh the rest: `aggregators.weight_by`).
      client_ids: i32[C], positions in the population; padding clients get ids
        `>= num_clients` (out of range, so a scatter with `mode='drop'` ignores them).
      batch_size: B, examples per local step.
    """

    order: np.ndarray
    start: np.ndarray
    length: np.ndarray
    num_steps: np.ndarray
    num_examples: np.ndarray
    weights: np.ndarray
    client_ids: np.ndarray
    batch_size: int


@dataclasses.dataclass(frozen=True)
class Batching:
    """How a client walks through its data in one round.

    Attributes:
      batch_size: examples per local step; None for one full batch of the whole client.
      num_epochs: passes over the client's data; epochs run back to back, so a batch may span
        the end of one epoch and the start of the next (as `repeat().batch()` does).
      max_steps: optional cap on local steps per round.
      drop_remainder: drop a last partial batch instead of masking it.
      max_examples_per_client: optional cap; a larger client uses its first this-many examples.
      shuffle: a fresh permutation of the client's examples each epoch, seeded by
        (seed, round, client id, epoch).
      straggler_fraction: the chance that a client is a straggler in a round, seeded by
        (seed, round, client id); a straggler runs a uniform number of epochs in
        [1, num_epochs] (FedProx's systems heterogeneity, Li et al. 2020, section 5.2).
      drop_stragglers: leave the stragglers' partial work out of the aggregate (weight 0,
        FedAvg's rule in that paper) instead of keeping it (FedProx's).

    Stragglers here are drawn at random with no clock; `fs.devices.DeviceModel` derives who
    is late from device profiles and a deadline instead, and caps steps through
    `pack_cohort(max_steps=)`. The two compose.
    """

    batch_size: int | None = 10
    num_epochs: int = 1
    max_steps: int | None = None
    drop_remainder: bool = False
    max_examples_per_client: int | None = None
    shuffle: bool = True
    straggler_fraction: float = 0.0
    drop_stragglers: bool = False

    def __post_init__(self):
        for name in ("batch_size", "num_epochs", "max_steps", "max_examples_per_client"):
            value = getattr(self, name)
            if value is not None or name == "num_epochs":
                check_integer(name, value, 1)
        check_bool("drop_remainder", self.drop_remainder)
        check_bool("shuffle", self.shuffle)
        check_bool("drop_stragglers", self.drop_stragglers)
        f = self.straggler_fraction
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 <= f <= 1:
            raise ValueError(f"straggler_fraction must be a number in [0, 1], got {f!r}")

    def examples_used(self, num_examples: np.ndarray) -> np.ndarray:
        n = np.asarray(num_examples, dtype=np.int64)
        if self.max_examples_per_client is not None:
            n = np.minimum(n, self.max_examples_per_client)
        return n

    def resolve_batch_size(self, data: FederatedData) -> int:
        """The static batch size: `batch_size`, or the largest client for full batches."""
        if self.batch_size is not None:
            return int(self.batch_size)
        return max(1, int(self.examples_used(data.num_examples).max()))

    def steps_and_length(self, n: np.ndarray, batch_size: int,
                         epochs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each client's local steps and `order` entries, for `epochs` each (default
        `num_epochs`)."""
        length = n * (self.num_epochs if epochs is None else epochs)
        if self.max_steps is not None:
            length = np.minimum(length, self.max_steps * batch_size)
        if self.drop_remainder:
            steps = length // batch_size
            length = steps * batch_size
        else:
            steps = -(-length // batch_size)
        return steps, length


@dataclasses.dataclass(frozen=True)
class CohortShape:
    """The fixed shapes of a population's cohorts: one compiled program serves every round."""

    size: int  # C, clients per cohort after padding
    batch_size: int  # B
    order_capacity: int  # L, entries of `order`
    pool_capacity: int  # rows of a host-packed pool

    @staticmethod
    def for_population(
        data: FederatedData, batching: Batching, cohort_size: int, multiple: int = 1
    ) -> CohortShape:
        """Shapes that fit any `cohort_size` clients of `data`, padded to `multiple` clients."""
        if cohort_size < 1:
            raise ValueError(f"cohort_size must be >= 1, got {cohort_size}")
        batch_size = batching.resolve_batch_size(data)
        n = batching.examples_used(data.num_examples)
        _, length = batching.steps_and_length(n, batch_size)
        take = min(cohort_size, data.num_clients)
        largest = np.sort(length)[::-1][:take].sum()
        largest_rows = np.sort(n)[::-1][:take].sum()
        size = -(-cohort_size // multiple) * multiple
        return CohortShape(size, batch_size, _round_up(largest + batch_size),
                           _round_up(largest_rows))


def _round_up(n: int, to: int = 256) -> int:
    return int(-(-max(int(n), 1) // to) * to)


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a counter-based hash, so shuffles need no per-client RNG object."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _unit(seed: int, round_num: int | np.ndarray, ids: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) draws per client from (seed, round, client id, salt): counter-based,
    like the shuffles, so a client's draw does not depend on the rest of the cohort."""
    h = _mix(_mix(np.uint64(seed) ^ (np.uint64(round_num) << np.uint64(32))
                  ^ (np.uint64(salt) << np.uint64(56))) ^ ids.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _argsort_within(segment: np.ndarray, key: np.ndarray, num_segments: int) -> np.ndarray:
    """The permutation sorting `key` (uint64) within each run of the nondecreasing `segment`.

    One sort of the segment in the high bits over the key's top bits (ties keep their order):
    four times faster than `np.lexsort` on the two, which was most of packing 1,000 clients.
    """
    seg_bits = max(int(num_segments - 1).bit_length(), 1)
    shift = np.uint64(seg_bits)
    combined = (segment.astype(np.uint64) << np.uint64(64 - seg_bits)) | (key >> shift)
    return np.argsort(combined, kind="stable")


def _planned(batching: Batching, n: np.ndarray, batch_size: int, indices: np.ndarray,
             seed: int, round_num: int | np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each client's straggler flag, local steps and `order` entries this round."""
    straggler = np.zeros(len(indices), bool)
    epochs = None
    if batching.straggler_fraction:
        straggler = _unit(seed, round_num, indices, 1) < batching.straggler_fraction
        drawn = 1 + np.minimum((_unit(seed, round_num, indices, 2) * batching.num_epochs)
                               .astype(np.int64), batching.num_epochs - 1)
        epochs = np.where(straggler, drawn, batching.num_epochs)
    return straggler, *batching.steps_and_length(n, batch_size, epochs)


def planned_work(data: FederatedData, indices: np.ndarray, batching: Batching,
                 batch_size: int, *, seed: int, round_num: int) -> tuple[np.ndarray, np.ndarray]:
    """The local steps and examples (`order` entries) `pack_cohort` gives the clients at
    `indices` in round `round_num` (stragglers' drawn epochs included), before any
    per-client cap: what a device model plans a client's time from."""
    indices = np.asarray(indices, dtype=np.int64)
    n = batching.examples_used(data.num_examples[indices])
    return _planned(batching, n, batch_size, indices, seed, round_num)[1:]


def pack_cohort(
    data: FederatedData,
    indices: np.ndarray,
    batching: Batching,
    shape: CohortShape,
    *,
    seed: int,
    round_num: int | np.ndarray,
    sort: bool = True,
    max_steps: np.ndarray | None = None,
) -> tuple[Cohort, np.ndarray]:
    """Packs the clients at population positions `indices` into a `Cohort`.

    Clients are sorted by step count (`sort`), or kept in the given order (another pass of a
    round whose clients must line up with the first's). `max_steps` caps each client's local
    steps (one per index: the device model's budget for a client cut off by a deadline), as
    `Batching.max_steps` caps everyone's. `round_num` may be one per client (aligned with
    `indices`): FedBuff trains clients sent at different times in one call, each shuffled as
    the round it was sent in would shuffle it.

    Returns the cohort and `rows`: the population rows of the cohort's clients, concatenated in
    cohort order. `cohort.order` indexes `rows` (a host-packed pool is `features[rows]`); for a
    population resident on the device, use `resident_order(cohort, rows)`.
    """
    indices = np.asarray(indices, dtype=np.int64)
    c = len(indices)
    if c > shape.size:
        raise ValueError(f"cohort of {c} clients does not fit the padded size {shape.size}")
    n = batching.examples_used(data.num_examples[indices])
    if np.any(n == 0):
        raise ValueError(
            f"client(s) {data.client_ids[indices[n == 0]][:5].tolist()} have zero examples"
        )
    b = shape.batch_size
    rounds = np.broadcast_to(np.asarray(round_num, np.uint64), (c,))
    straggler, steps, length = _planned(batching, n, b, indices, seed, rounds)
    if max_steps is not None:  # a step budget cuts the order too, so masked batches stay right
        cap = np.asarray(max_steps, np.int64)
        if cap.shape != (c,) or np.any(cap < 0):
            raise ValueError(f"max_steps must be one integer >= 0 per client ({c}), got "
                             f"{cap.tolist()[:5]}")
        steps, length = np.minimum(steps, cap), np.minimum(length, cap * b)

    if sort:  # Largest clients first: chunks of similar step counts waste fewer masked steps.
        by_steps = np.lexsort((indices, -steps))
        indices, n, steps, length, straggler, rounds = (
            indices[by_steps], n[by_steps], steps[by_steps], length[by_steps],
            straggler[by_steps], rounds[by_steps])

    # Pool rows: each client's first n examples (the cap keeps the first ones).
    full_counts = data.num_examples[indices]
    rows_all = rows_of(data.offsets, indices)
    keep = np.arange(len(rows_all)) - np.repeat(np.cumsum(full_counts) - full_counts, full_counts)
    rows = rows_all[keep < np.repeat(n, full_counts)]
    pool_start = np.cumsum(n) - n

    # Order: for each client, epoch after epoch, a permutation of its examples, cut at length.
    epochs_needed = -(-length // n)
    seg_len = np.repeat(n, epochs_needed)  # one segment per (client, epoch)
    seg_client = np.repeat(np.arange(c), epochs_needed)
    seg_epoch = np.arange(len(seg_len)) - np.repeat(np.cumsum(epochs_needed) - epochs_needed,
                                                    epochs_needed)
    total = int(seg_len.sum())
    seg_of = np.repeat(np.arange(len(seg_len)), seg_len)
    j = np.arange(total) - np.repeat(np.cumsum(seg_len) - seg_len, seg_len)
    if batching.shuffle:
        base = _mix(_mix(np.uint64(seed) ^ (rounds[seg_client] << np.uint64(32))) ^
                    indices[seg_client].astype(np.uint64))
        key = _mix(_mix(base ^ (seg_epoch.astype(np.uint64) << np.uint64(40)))[seg_of] ^
                   j.astype(np.uint64))
        j = j[_argsort_within(seg_of, key, len(seg_len))]
    local = pool_start[seg_client[seg_of]] + j
    # Cut each client's run of epochs at its length.
    client_run = n * epochs_needed
    within = np.arange(total) - np.repeat(np.cumsum(client_run) - client_run, client_run)
    local = local[within < np.repeat(length, client_run)]

    if len(local) > shape.order_capacity:
        raise ValueError(
            f"cohort needs {len(local)} order entries, capacity {shape.order_capacity}")
    order = np.zeros(shape.order_capacity, dtype=np.int32)
    order[: len(local)] = local
    start = np.cumsum(length) - length

    # A client too small for one full batch (drop_remainder) trains no step: its zero update
    # must not pull the average toward no change.
    weights = (steps > 0).astype(np.float32)
    if batching.drop_stragglers:
        weights = np.where(straggler, 0, weights).astype(np.float32)

    pad = shape.size - c

    def padded(x, fill, dtype):
        return np.concatenate([x, np.full(pad, fill)]).astype(dtype)

    cohort = Cohort(
        order=order,
        start=padded(start, 0, np.int32),
        length=padded(length, 0, np.int32),
        num_steps=padded(steps, 0, np.int32),
        num_examples=padded(n, 0, np.int32),
        weights=padded(weights, 0, np.float32),
        client_ids=np.concatenate(
            [indices, data.num_clients + np.arange(pad)]
        ).astype(np.int32),
        batch_size=b,
    )
    return cohort, rows


def resident_order(cohort: Cohort, rows: np.ndarray) -> Cohort:
    """The cohort re-indexed to population rows, for a population resident on the device."""
    order = rows[cohort.order].astype(np.int32) if len(rows) else cohort.order
    return dataclasses.replace(cohort, order=order)


def host_pool(data: FederatedData, rows: np.ndarray, shape: CohortShape) -> dict[str, np.ndarray]:
    """The cohort's examples gathered on the host, zero-padded to the fixed pool capacity."""
    pool = {}
    for k, v in data.features.items():
        out = np.zeros((shape.pool_capacity,) + v.shape[1:], dtype=v.dtype)
        out[: len(rows)] = v[rows]
        pool[k] = out
    return pool
