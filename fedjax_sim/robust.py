"""Byzantine-robust aggregation: rules that bound what a few bad clients can do to the aggregate.

Each rule is an aggregation stage (`fs.aggregators.stage`), so it goes in a chain in place of
the mean. The order statistics and distance rules are "rows" reductions: the engine stacks
every client's (output, weight) as `[C, ...]`, gathered across devices, and the rule reads
them on the server. A client counts when its weight is > 0 (padding, a client with no step and
a non-finite one have weight 0, `mask_nonfinite`); uncounted rows are never picked, never a
neighbour and never part of an order statistic. The number of counted clients n is traced (it
changes with dropouts), so trims and neighbour counts are taken at runtime.

- `median()`, `trimmed_mean(beta)` (Yin et al. 2018) and `krum(f)`, `multi_krum(f, m)`
  (Blanchard et al. 2017) count each counted client once, as in their papers: the weights
  decide only who counts.
- `geometric_median(...)` (RFA, Pillutla et al. 2022) and `centered_clipping(tau)`
  (Karimireddy et al. 2021) are built on a weighted mean and take the clients' weights
  (uniform weights give the papers' rules).
- `norm_bound(max_norm)` (Sun et al. 2019) is a per-client stage: each update clipped to an L2
  norm before the (streamed) mean.

The cohort size is unknown when a chain is built: Krum's and multi-Krum's `check` refuses a
cohort too small for f before anything compiles (`fs.Simulation` calls the chain's check with
the sampler's largest cohort). All rules accumulate in at least float32.

Example:
  >>> import fedjax_sim as fs
  >>> agg = fs.aggregators.chain(fs.aggregators.weight_by("uniform"), fs.robust.krum(f=2))
  >>> agg.check(20)  # a cohort of 20 tolerates f = 2
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedjax_sim.aggregators import Aggregator, _accumulator, clip, stage

# Column block of the order statistics on XLA:CPU: 64 coordinates x the cohort (256 KB at
# 1,000 clients) stay in a core's L2 cache for all of a selection's passes. Measured on the
# loaded 2-core CPU, the median of [1000, 16384] float32: 0.10 s at 64, 0.28 s at 128, 0.18 s
# at 256, 0.30 s at 1024, 1.24 s unblocked; a sort along the client axis took 6.1 s.
_CPU_BLOCK = 64


def _sort_keys(x: jax.Array) -> jax.Array:
    """Unsigned integers ordered as the floats `x` are (the sign bit flipped for positives,
    every bit for negatives), so an order statistic is found by integer compares."""
    width = jnp.finfo(x.dtype).bits
    signed, unsigned = jnp.dtype(f"int{width}"), jnp.dtype(f"uint{width}")
    bits = lax.bitcast_convert_type(x, signed)
    key = jnp.where(bits >= 0, bits, bits ^ jnp.asarray(jnp.iinfo(signed).max, signed))
    return lax.bitcast_convert_type(key, unsigned) ^ (jnp.asarray(1, unsigned) << (width - 1))


def _from_sort_keys(key: jax.Array, dtype) -> jax.Array:
    """The floats of `_sort_keys`' integers."""
    width = jnp.finfo(dtype).bits
    signed = jnp.dtype(f"int{width}")
    bits = lax.bitcast_convert_type(key ^ (jnp.asarray(1, key.dtype) << (width - 1)), signed)
    return lax.bitcast_convert_type(jnp.where(bits >= 0, bits,
                                              bits ^ jnp.asarray(jnp.iinfo(signed).max, signed)),
                                    dtype)


def _select(keys: jax.Array, rank: jax.Array) -> jax.Array:
    """The `rank`-th smallest (from 0) of `keys` ([C, b]) in each column: [b].

    Bit by bit from the top, the largest a with fewer than rank + 1 keys below it, which is
    the order statistic itself: one compare-and-count pass over the cohort per bit, exact (an
    element of the column). One rank a call: two ranks stacked in one pass (a [2, C, b]
    count) ran 4x slower than one on XLA:CPU.
    """
    width = jnp.iinfo(keys.dtype).bits
    one = jnp.asarray(1, keys.dtype)

    def bit(i, ans):
        cand = ans | (one << (width - 1 - i).astype(keys.dtype))
        below = jnp.sum(keys < cand, axis=0, dtype=jnp.int32)
        return jnp.where(below <= rank, cand, ans)

    return lax.fori_loop(0, width, bit, jnp.zeros(keys.shape[1], keys.dtype))


def _by_coordinates(fn, rows: jax.Array) -> jax.Array:
    """`fn` (`[C, b]` -> `[b]`) over a leaf's coordinates, in column blocks on the CPU (one
    block elsewhere, where the passes run in parallel over the whole leaf): the leaf's shape
    without the client axis."""
    x = rows.reshape(rows.shape[0], -1)
    p = x.shape[1]
    block = _CPU_BLOCK if jax.default_backend() == "cpu" else p
    full = p // block
    parts = []
    if full:
        blocks = lax.map(lambda j: fn(lax.dynamic_slice_in_dim(x, j * block, block, axis=1)),
                         jnp.arange(full))
        parts.append(blocks.reshape(-1))
    if p % block:
        parts.append(fn(x[:, full * block:]))
    return jnp.concatenate(parts).reshape(rows.shape[1:]) if len(parts) > 1 else \
        parts[0].reshape(rows.shape[1:])


def _counted_keys(block: jax.Array, counts: jax.Array) -> jax.Array:
    """The block's sort keys in its accumulator dtype, uncounted rows as the largest key
    (after every finite value: counted outputs are finite, `mask_nonfinite`)."""
    keys = _sort_keys(block.astype(_accumulator(block.dtype)))
    return jnp.where(counts[:, None], keys, jnp.asarray(jnp.iinfo(keys.dtype).max, keys.dtype))


def _weighted_rows(coef: jax.Array, rows: jax.Array) -> jax.Array:
    """`sum_c coef[c] rows[c]` in the accumulator dtype (a matrix-vector product)."""
    acc = _accumulator(rows.dtype)
    return jnp.tensordot(coef.astype(acc), rows.astype(acc), axes=1,
                         precision=lax.Precision.HIGHEST)


def _row_sq_norms(tree) -> jax.Array:
    """Each client's squared L2 norm over all leaves together: f32[C]."""
    return sum(jnp.sum(jnp.square(x.astype(_accumulator(x.dtype))),
                       axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(tree))


def _row_distances(tree, center) -> jax.Array:
    """Each client's L2 distance to `center` (the template's shape) over all leaves: f32[C]."""
    diff = jax.tree.map(lambda x, c: x.astype(_accumulator(x.dtype)) - c[None], tree, center)
    return jnp.sqrt(_row_sq_norms(diff))


def _normalized(weights: jax.Array) -> jax.Array:
    """Counted clients' weights over their sum (zeros when none counts)."""
    w = jnp.where(weights > 0, weights, 0.0).astype(jnp.float32)
    total = jnp.sum(w)
    return w / jnp.where(total > 0, total, 1.0)


def median() -> Aggregator:
    """The coordinate-wise median over the counted clients (weight > 0, each counted once), a
    rows reduction (zero if none counts). For an odd number n of counted clients it is
    exactly the middle client's coordinate; for an even n the mean of the two middle ones.

    The middle values are selected bit by bit (`_select`: a compare-and-count pass over the
    cohort per bit of the float, on column blocks that stay in cache on the CPU), not sorted:
    XLA:CPU's sort along the client axis was 15x slower.

    References: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
      Towards Optimal Statistical Rates", ICML 2018 (coordinate-wise median).

    Example:
      >>> agg = fs.aggregators.chain(fs.aggregators.weight_by("uniform"), median())
    """

    def server(reduced, state, key):
        counts = reduced.weight > 0
        n = jnp.sum(counts, dtype=jnp.int32)
        lo_rank = jnp.maximum((n - 1) // 2, 0)

        def column(block):
            # One selection, s_lo; for an even n the next value s_lo+1 is s_lo itself when
            # enough keys tie with it, else the least key above it (one pass, not 32).
            keys = _counted_keys(block, counts)
            lo_key = _select(keys, lo_rank)
            ties = jnp.sum(keys <= lo_key, axis=0, dtype=jnp.int32)
            top = jnp.asarray(jnp.iinfo(keys.dtype).max, keys.dtype)
            above = jnp.min(jnp.where(keys > lo_key, keys, top), axis=0)
            hi_key = jnp.where(ties > n // 2, lo_key, above)
            lo, hi = _from_sort_keys(jnp.stack([lo_key, hi_key]), _accumulator(block.dtype))
            return jnp.where(n == 0, 0.0, jnp.where(lo_key == hi_key, lo, (lo + hi) / 2))

        def one(rows):
            return _by_coordinates(column, rows)

        return jax.tree.map(one, reduced.output), state, {"weight_sum": jnp.sum(reduced.weight)}

    return stage("median", server=server, reduction="rows")


def trimmed_mean(beta: float) -> Aggregator:
    """The coordinate-wise beta-trimmed mean: per coordinate, the floor(beta n) largest and
    smallest of the n counted clients dropped and the rest averaged (each counted once), a
    rows reduction (zero if none counts). Reports "trimmed" (clients dropped at each end).

    n is traced, so the trim is looked up at runtime in a table of floor(beta n) for every
    possible n (exact in float64, where `beta * n` in float32 could round across an integer).
    The two cut values are selected as the median's are, then one pass sums what lies
    between them (ties at a cut counted as often as they fall inside).

    References: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
      Towards Optimal Statistical Rates", ICML 2018 (Section 3, trimmed mean).

    Example:
      >>> agg = fs.aggregators.chain(fs.aggregators.weight_by("uniform"), trimmed_mean(0.1))
    """
    from fedjax_sim.checks import check_number

    beta = check_number("beta (the trimmed fraction)", beta, at_least=0)
    if beta >= 0.5:
        raise ValueError(f"trimmed_mean's beta is the fraction trimmed at each end and must be "
                         f"in [0, 0.5), got {beta:g}: nothing would be left to average")

    def server(reduced, state, key):
        counts = reduced.weight > 0
        n = jnp.sum(counts, dtype=jnp.int32)
        cohort = reduced.weight.shape[0]
        t = jnp.asarray(np.floor(beta * np.arange(cohort + 1)).astype(np.int32))[n]
        hi_rank = jnp.maximum(n - t - 1, 0)
        kept = jnp.maximum(n - 2 * t, 1)

        def column(block):
            # The kept positions [t, n - t) hold lo = s_t and hi = s_(n-t-1) at their ends,
            # every value strictly between, and as many copies of lo (hi) as fall inside.
            keys = _counted_keys(block, counts)
            lo_key, hi_key = _select(keys, t), _select(keys, hi_rank)
            lo, hi = _from_sort_keys(jnp.stack([lo_key, hi_key]), _accumulator(block.dtype))
            x = block.astype(lo.dtype)
            inside = jnp.sum(jnp.where((keys > lo_key) & (keys < hi_key), x, 0), axis=0)
            lows = jnp.sum(keys <= lo_key, axis=0, dtype=jnp.int32) - t
            highs = n - t - jnp.sum(keys < hi_key, axis=0, dtype=jnp.int32)
            total = inside + lo * lows + hi * highs
            mean = jnp.where(lo_key == hi_key, lo, total / kept.astype(lo.dtype))
            return jnp.where(n == 0, 0.0, mean)

        def one(rows):
            return _by_coordinates(column, rows)

        return jax.tree.map(one, reduced.output), state, {
            "weight_sum": jnp.sum(reduced.weight), "trimmed": t.astype(jnp.float32)}

    return stage("trimmed_mean", server=server, reduction="rows")


# Row blocks of Krum's Gram matrix: only the blocks on and above the diagonal are multiplied,
# (B + 1) / 2B of the full product's work (0.56 at 8), the rest is their transpose. Blocks
# of fewer than 64 clients are not worth their extra compile and copies.
_GRAM_BLOCKS, _GRAM_MIN_ROWS = 8, 64


def _gram(x: jax.Array, blocks: int | None = None) -> jax.Array:
    """`x x^T` ([C, P] -> [C, C]) in the accumulator dtype, from the upper triangle of
    `blocks` row blocks (default: up to 8 of at least 64 clients each)."""
    x = x.astype(_accumulator(x.dtype))
    c = x.shape[0]
    if blocks is None:
        blocks = min(_GRAM_BLOCKS, max(1, c // _GRAM_MIN_ROWS))
    if blocks == 1:
        return jnp.dot(x, x.T, precision=lax.Precision.HIGHEST)
    size = -(-c // blocks)
    starts = range(0, c, size)
    upper = jnp.concatenate([
        jnp.concatenate([jnp.zeros((min(size, c - s), s), x.dtype),
                         jnp.dot(x[s:s + size], x[s:].T, precision=lax.Precision.HIGHEST)],
                        axis=1) for s in starts])
    block = jnp.arange(c) // size
    return jnp.where(block[:, None] <= block[None, :], upper, upper.T)


def _krum_stage(name: str, f: int, m: int | None) -> Aggregator:
    """Krum (m = 1) and multi-Krum's shared stage; `m=None` is multi-Krum's default n - f."""

    def check(cohort_size: int) -> None:
        if cohort_size <= 2 * f + 2:
            raise ValueError(f"{name} with f = {f} Byzantine clients needs a cohort of n > 2f + "
                             f"2 = {2 * f + 2} clients, got n = {cohort_size}: lower f or "
                             "sample more clients")
        if m is not None and m > cohort_size - f:
            raise ValueError(f"{name}'s m = {m} must be in [1, n - f] = [1, {cohort_size - f}] "
                             f"for a cohort of n = {cohort_size} with f = {f}")

    def server(reduced, state, key):
        rows, counts = reduced.output, reduced.weight > 0
        cohort = counts.shape[0]
        n = jnp.sum(counts, dtype=jnp.int32)
        # Pairwise squared distances over all leaves flattened together from the Gram
        # matrix: ||a||^2 + ||b||^2 - 2 a.b, never a [C, C, P] difference.
        gram = sum(_gram(x.reshape(cohort, -1)) for x in jax.tree.leaves(rows))
        sq = jnp.diagonal(gram)
        dist = jnp.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
        neighbour = counts[None, :] & ~jnp.eye(cohort, dtype=bool)
        nearest = jnp.sort(jnp.where(neighbour, dist, jnp.inf), axis=1)
        k = n - f - 2  # neighbours in each score
        score = jnp.sum(jnp.where(jnp.arange(cohort)[None, :] < k, nearest, 0.0), axis=1)
        score = jnp.where(counts, score, jnp.inf)
        enough = n > 2 * f + 2
        want = n - f if m is None else jnp.minimum(m, n - f)
        # A stable argsort: ties go to the lowest cohort position, as numpy's does.
        rank = jnp.argsort(jnp.argsort(score, stable=True), stable=True)
        selected = jnp.where(enough, rank < want, counts)
        count = jnp.sum(selected, dtype=jnp.int32)
        coef = selected / jnp.maximum(count, 1).astype(jnp.float32)
        value = jax.tree.map(lambda x: _weighted_rows(coef, x), rows)
        return value, state, {"weight_sum": jnp.sum(reduced.weight),
                              "krum_selected": count.astype(jnp.float32),
                              "krum_fallback": (~enough & (n > 0)).astype(jnp.float32)}

    return stage(name, server=server, reduction="rows", check=check)


def krum(f: int) -> Aggregator:
    """Krum: the one counted client's update whose n - f - 2 nearest counted neighbours (in
    squared L2 distance over all leaves) are closest in sum, a rows reduction. Tolerates f
    Byzantine clients among n > 2f + 2.

    The pairwise distances come from the Gram matrix, a matmul over the upper block
    triangle (`_gram`, about half the `[C, P] x [P, C]` product). The cohort is checked against
    n > 2f + 2 before compiling (`check`); in a round where fewer than 2f + 3 clients count
    (dropouts) there is no Krum choice, and the rule falls back to the (unweighted) mean of
    the counted clients, reported as "krum_fallback" = 1. Reports "krum_selected" (clients
    averaged: 1, or n in a fallback).

    References: Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
      Byzantine Tolerant Gradient Descent", NeurIPS 2017 (Krum, Section 4).

    Example:
      >>> agg = fs.aggregators.chain(fs.aggregators.weight_by("uniform"), krum(f=2))
    """
    from fedjax_sim.checks import check_integer

    return _krum_stage("krum", check_integer("f", f, 0), 1)


def multi_krum(f: int, m: int | None = None) -> Aggregator:
    """Multi-Krum: the (unweighted) mean of the m counted clients with the best Krum scores
    (`krum`); m = 1 is Krum, and m = n - f (the default, None) with f = 0 the plain mean of
    the counted clients. At runtime m is capped at n - f of the clients counted in the round;
    with n <= 2f + 2 of them it falls back as `krum` does.

    References: Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
      Byzantine Tolerant Gradient Descent", NeurIPS 2017 (multi-Krum, Section 5).

    Example:
      >>> agg = fs.aggregators.chain(fs.aggregators.weight_by("uniform"), multi_krum(2, m=10))
    """
    from fedjax_sim.checks import check_integer

    f = check_integer("f", f, 0)
    return _krum_stage("multi_krum", f, None if m is None else check_integer("m", m, 1))


def geometric_median(iters: int = 3, eps: float = 1e-5, smoothing: float = 1e-6) -> Aggregator:
    """RFA: the weighted geometric median of the counted clients' updates (all leaves as one
    vector) by smoothed Weiszfeld iterations, a rows reduction (zero if none counts).

    From the weighted mean v, each iteration sets `beta_i = alpha_i / max(smoothing,
    ||v - x_i||)` and `v <- sum_i beta_i x_i / sum_i beta_i`, with alpha the clients' weights
    over their sum; it stops after `iters` iterations or once the objective `sum_i alpha_i
    ||v - x_i||` improves by less than `eps` of itself. Reports "gm_iterations" and
    "gm_objective" (at the returned v).

    References: Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning",
      IEEE Transactions on Signal Processing 2022 (Algorithm 2, smoothed Weiszfeld).

    Example:
      >>> agg = fs.aggregators.chain(fs.aggregators.weight_by("num_examples"),
      ...                            geometric_median(iters=3))
    """
    from fedjax_sim.checks import check_integer, check_number

    iters = check_integer("iters", iters, 1)
    eps = check_number("eps", eps, at_least=0)
    nu = check_number("smoothing", smoothing, above=0)

    def server(reduced, state, key):
        rows, alpha = reduced.output, _normalized(reduced.weight)

        def at(v):  # (v, each client's distance to it, the objective): distances carried
            d = _row_distances(rows, v)
            return v, d, jnp.sum(alpha * d)

        def body(carry):
            i, (_, d, obj), _ = carry
            beta = alpha / jnp.maximum(nu, d)
            beta = beta / jnp.where(jnp.sum(beta) > 0, jnp.sum(beta), 1.0)
            new = at(jax.tree.map(lambda x: _weighted_rows(beta, x), rows))
            return i + 1, new, jnp.abs(obj - new[2]) <= eps * new[2]

        def cond(carry):
            i, _, converged = carry
            return (i < iters) & ~converged

        start = at(jax.tree.map(lambda x: _weighted_rows(alpha, x), rows))
        i, (v, _, obj), _ = lax.while_loop(cond, body, (jnp.int32(0), start, jnp.bool_(False)))
        return v, state, {"weight_sum": jnp.sum(reduced.weight),
                          "gm_iterations": i.astype(jnp.float32), "gm_objective": obj}

    return stage("geometric_median", server=server, reduction="rows")


def norm_bound(max_norm: float) -> Aggregator:
    """Norm bounding: each client's update scaled to an L2 norm of at most `max_norm` (all
    leaves together) before the reduction, so a boosted (model-replacement) update moves the
    mean no more than an honest one can. A per-client stage (`fs.aggregators.clip` under the
    defence's name): chain it before a mean. Reports "clipped" per client.

    References: Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?",
      2019 (norm thresholding of updates, Section 3).

    Example:
      >>> agg = fs.aggregators.chain(norm_bound(1.0), fs.aggregators.weight_by("uniform"),
      ...                            fs.aggregators.mean())
    """
    clipping = clip(max_norm)  # its bound in the state, as clip's (a sweep's "clip_norm")
    return stage("norm_bound", client=clipping.client, init=clipping.init)


def centered_clipping(tau: float, iters: int = 1) -> Aggregator:
    """Centered clipping: from the previous round's aggregate v (zeros at first), `iters`
    times `v <- v + sum_i alpha_i clip(x_i - v, tau)`, where clip scales to L2 norm at most
    tau (all leaves together) and alpha is the counted clients' weights over their sum; a
    rows reduction whose state is v. A round where no client counts keeps v and aggregates
    zero. Reports "cc_clipped" (the fraction of counted clients clipped in the last
    iteration).

    References: Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
      Optimization", ICML 2021 (Algorithm 2, centered clipping; one iteration as there).

    Example:
      >>> agg = fs.aggregators.chain(fs.aggregators.weight_by("uniform"),
      ...                            centered_clipping(tau=1.0))
    """
    from fedjax_sim.checks import check_integer, check_number

    tau = check_number("tau", tau, above=0)
    iters = check_integer("iters", iters, 1)

    def init(template):
        return jax.tree.map(lambda t: jnp.zeros(jnp.shape(t), _accumulator(jnp.result_type(t))),
                            template)

    def server(reduced, v, key):
        rows, alpha = reduced.output, _normalized(reduced.weight)
        counts = reduced.weight > 0

        def body(_, carry):
            v, _ = carry
            d = _row_distances(rows, v)
            scale = jnp.minimum(1.0, tau / jnp.maximum(d, jnp.finfo(d.dtype).tiny))
            coef = alpha * scale
            v = jax.tree.map(lambda c, x: c + _weighted_rows(coef, x) - jnp.sum(coef) * c,
                             v, rows)
            return v, jnp.sum(counts & (d > tau))

        v, clipped = lax.fori_loop(0, iters, body, (v, jnp.int32(0)))
        n = jnp.sum(counts)
        value = jax.tree.map(lambda c: jnp.where(n > 0, c, jnp.zeros_like(c)), v)
        return value, v, {"weight_sum": jnp.sum(reduced.weight),
                          "cc_clipped": clipped / jnp.maximum(n, 1).astype(jnp.float32)}

    return stage("centered_clipping", server=server, reduction="rows", init=init)
