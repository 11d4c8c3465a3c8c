"""Secure aggregation (SecAgg, SecAgg+) and distributed DP, simulated as a reduction stage.

Each client clips its update to `clip_norm`, scales it by `scale` and rounds it stochastically
(unbiased) to integers, optionally adds integer DP noise (Skellam or discrete Gaussian), and
sends the result as elements of the ring Z_(2^bits), masked with pairwise masks that cancel in
the sum. The engine's streamed sum adds the ring elements in uint32, whose wrap-around is the
ring's arithmetic (2^bits divides 2^32; `lax.psum` across devices wraps the same way), so the
unmasked sum equals the plaintext sum of the quantized vectors bit for bit, whatever K and the
device count. The server reduces it modulo 2^bits, reads it as signed, unscales it and divides
by the (expected) weight.

What is simulated, and how:
- Neighbours (SecAgg+): a Harary graph over the round's participants (the clients of weight
  > 0) laid on a ring in a random order from the cohort's key: each client has `degree`
  neighbours (every other participant when the cohort is that small), as Bell et al. do. A
  pair's mask comes from a seed of the cohort's key and the two participants' slots; the lower
  slot adds it, the higher subtracts it. `degree >= max_clients - 1` is SecAgg's complete
  graph (Bonawitz et al.).
- Dropouts: each participant drops after masking with probability `dropout`, drawn from the
  cohort's key and its slot, so every party can tell who dropped. A dropped client sends
  nothing; the masks its surviving neighbours hold with it are removed as the server does
  after rebuilding its pair seeds from the survivors' Shamir shares. Shamir sharing itself is
  not computed: its condition is, i.e. a client's seeds can be rebuilt iff at least
  `threshold` of its neighbours survived. That condition applies to the dropped clients'
  pair seeds and to the survivors' self-mask seeds alike (self masks themselves are not
  added: once rebuilt they cancel exactly). If any participant falls short, the round cannot
  be unmasked: the aggregate is zero and the server metric `secagg_unrecoverable` counts the
  clients that could not be recovered (a run must stop on it: `Simulation` raises).
- Masks are exact by construction, so they are generated only with `masks=True` (tests and
  verification runs): each client draws `degree` PRNG vectors the size of its update, which
  would dominate a 1,000-client round. Without them the quantization, the ring arithmetic,
  the dropout, threshold and overflow logic run just the same, and the result is the same
  bits.
- Overflow: the sum wraps in a coordinate only if the clients' magnitudes there add up to
  2^(bits-1) or more. A configuration where the clipped, quantized signal alone can reach it
  (`max_clients * ceil(clip_norm * scale) >= 2^(bits-1)`) is refused at construction; at run
  time `secagg_overflow_bound` (the sum over clients of a bound on each one's largest
  magnitude, over 2^(bits-1)) reports how close the round came: below 1, no coordinate can
  have wrapped. With noise the bound is the largest entry itself; without, the clipped norm
  plus one (|q_i| <= ||y||_2 + 1), which costs no pass over the update (an integer max did:
  a quarter of the stage's time). Not done: Kairouz et al.'s random rotation and modular
  clipping, which let a small ring hold the typical rather than the worst-case sum.

Distributed DP (`noise="skellam"` or `"discrete_gaussian"`): each client adds integer noise of
variance `(noise_multiplier * D2)^2 / min_clients` per coordinate, where D2 bounds the L2 norm
of a client's quantized update (conditional randomized rounding: a rounding whose norm exceeds
D2 is drawn again), so any `min_clients` surviving clients together add the noise of a
Gaussian mechanism of multiplier `noise_multiplier`. `privacy` gives the accountant the
papers' guarantees: the Skellam mechanism's RDP bound as an `fs.privacy.RdpCurve`, the
distributed discrete Gaussian's as a dp-accounting `ZCDpEvent`. Neither paper's bound comes
with amplification by subsampling in dp-accounting, so every round is charged in full
(a valid bound for Poisson and fixed-size sampling: sampling only adds privacy); a fixed-size
cohort's replace-one neighbours double the sensitivities.

References:
  Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
    CCS 2017 (SecAgg).
  Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server Aggregation with
    (Poly)Logarithmic Overhead", CCS 2020 (SecAgg+).
  Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning
    with Secure Aggregation", ICML 2021.
  Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
    Learning", NeurIPS 2021.
  Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020.

Example:
  >>> from fedjax_sim import aggregators as agg, secagg
  >>> chain = agg.chain(agg.weight_by("uniform"),
  ...                   secagg.secagg(clip_norm=1.0, max_clients=100, bits=20, dropout=0.05))
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.aggregators import Aggregator, stage
from fedjax_sim.checks import check_bool, check_integer, check_number
from fedjax_sim.privacy import RdpCurve, participations

# The most levels per clip norm: stochastic rounding needs float32 to hold y's fraction.
MAX_LEVELS = 2.0**22
# Integer orders: the Skellam bound holds at integer orders (Agarwal et al. 2021, Thm 3.5).
SKELLAM_ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256, 512, 1024)
_SALT = 0x5EC  # folded into the client's and the cohort's keys: this stage's randomness
# Per client and coordinate: Poisson(v / 2) stays far inside int32 and float32's integers
# (jax.random.poisson loops forever past int32), and so does the discrete Gaussian's sampler.
MAX_NOISE_VARIANCE = 2.0**25
# The float32 norm test accepts a rounding within D2; the accounting charges D2 this much
# larger, covering float32 summation's error with ample room in practice (typical relative
# error sqrt(d) 2^-24, 6e-5 at d = 10^6), not in its worst case (d 2^-24).
NORM_SLACK = 2.0**-12
MAX_TRIES = 64  # then the rounding is toward zero, whose norm never exceeds the input's


def rounded_l2_bound(levels: float, dimension: int, beta: float) -> float:
    """D2: the L2 norm conditional randomized rounding keeps a client's integer vector within,
    for a vector of norm at most `levels` in `dimension` coordinates; a plain stochastic
    rounding stays within it with probability at least 1 - beta (Kairouz et al. 2021,
    Theorem 23 / Eq. 34 of the arXiv version)."""
    d = dimension
    tight = levels**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (levels + math.sqrt(d) / 2)
    return min(math.sqrt(tight), levels + math.sqrt(d))


def rounded_l1_bound(l2: float, dimension: int) -> float:
    """D1 of an integer vector of L2 norm at most `l2`: at most sqrt(d) l2 (Cauchy-Schwarz)
    and at most l2^2 (|q_i| <= q_i^2 for integers)."""
    return min(math.sqrt(dimension) * l2, l2**2)


def skellam_rdp(order: int, l2: float, l1: float, variance: float) -> float:
    """The Skellam mechanism's RDP at integer `order` > 1: Sk noise of `variance` per
    coordinate on an integer query of L2 and L1 sensitivities `l2`, `l1` (Agarwal, Kairouz,
    Liu 2021, Theorem 3.5 / Corollary 3.6, with mu the variance):
    a l2^2 / (2 mu) + min(((2a - 1) l2^2 + 6 l1) / (4 mu^2), 3 l1 / (2 mu))."""
    a, mu = order, variance
    return a * l2**2 / (2 * mu) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2),
                                      3 * l1 / (2 * mu))


def ddg_rho(l2: float, l1: float, local_stddev: float, num_clients: int, dimension: int) -> float:
    """rho of the zCDP guarantee of `num_clients` discrete Gaussians N_Z(0, local_stddev^2)
    summed, on an integer query of sensitivities `l2`, `l1` in `dimension` coordinates
    (Kairouz, Liu, Steinke 2021, Theorem 1 / Proposition 14, its second term, which holds at
    every order): rho = (l2^2 / s^2 + 2 l1 tau / s + tau^2 d) / 2 with s^2 = n local^2 and
    tau = 10 sum_{k<n} exp(-2 pi^2 local^2 k / (k + 1))."""
    n, v = num_clients, local_stddev**2
    tau = 10 * sum(math.exp(-2 * math.pi**2 * v * k / (k + 1)) for k in range(1, n))
    s = math.sqrt(n * v)
    return 0.5 * (l2**2 / s**2 + 2 * l1 * tau / s + tau**2 * dimension)


def dither(key, shape) -> jax.Array:
    """Uniform floats in [0, 1) on a 2^-24 grid, one per entry: a Weyl sequence over the
    entries' indices, offset by two words of `key` and mixed by MurmurHash3's 32-bit
    finalizer. Rounding needs one draw per coordinate of every client's update: with threefry
    (`jax.random.uniform`) the aggregation of a 159,010-entry update (the 784-200-10 MLP's)
    took 1.1 ms per client at K = 4 on the 2-core CPU against the plain mean's 0.14 ms, a
    FedAvg round's whole per-client time twice over; with this hash, fused into the
    rounding's own pass, 0.20 ms."""
    seed = jax.random.bits(key, (2,), jnp.uint32)
    size = math.prod(shape)
    h = jax.lax.iota(jnp.uint32, size).reshape(shape) * jnp.uint32(0x9E3779B9) + seed[0]
    h = h ^ seed[1]
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def stochastic_round(leaves, key, scale, bound=None):
    """Each float leaf times `scale`, rounded down or up at random with the probability that
    makes it unbiased (int32; `dither`'s draws). With `bound`, a rounding whose L2 norm
    exceeds it is drawn again (conditional randomized rounding; Kairouz et al. 2021), up to
    `MAX_TRIES` times, after which it rounds toward zero (never past the input's norm; with
    `rounded_l2_bound`'s D2 a try fails with probability at most beta, so this is a
    safeguard, not a path taken)."""
    scaled = [x.astype(jnp.float32) * scale for x in leaves]

    def draw(k):
        out = []
        for i, y in enumerate(scaled):
            low = jnp.floor(y)
            up = dither(jax.random.fold_in(k, i), y.shape) < y - low
            out.append((low + up).astype(jnp.int32))
        return out

    if bound is None:
        return draw(key)
    limit = jnp.float32(bound) ** 2
    sq = lambda q: sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in q)
    first = draw(jax.random.fold_in(key, 0))

    def body(carry):
        t, _ = carry
        return t + 1, draw(jax.random.fold_in(key, t))

    _, q = jax.lax.while_loop(lambda c: (sq(c[1]) > limit) & (c[0] < MAX_TRIES), body,
                                  (jnp.int32(1), first))
    over = sq(q) > limit
    return [jnp.where(over, jnp.trunc(y).astype(jnp.int32), v) for y, v in zip(scaled, q,
                                                                               strict=True)]


def skellam_noise(key, shape, variance: float) -> jax.Array:
    """Symmetric Skellam noise, Poisson(v/2) - Poisson(v/2): integers of variance v."""
    k1, k2 = jax.random.split(key)
    lam = variance / 2
    return (jax.random.poisson(k1, lam, shape, jnp.int32)
            - jax.random.poisson(k2, lam, shape, jnp.int32))


def discrete_gaussian_noise(key, shape, stddev: float) -> jax.Array:
    """The discrete Gaussian N_Z(0, stddev^2) (P(x) proportional to exp(-x^2 / (2 s^2)) on the
    integers) by Canonne, Kamath and Steinke's rejection sampler (2020, Algorithm 3): a
    discrete Laplace of scale t = floor(s) + 1 accepted with probability
    exp(-(|y| - s^2 / t)^2 / (2 s^2)); in float32 arithmetic, not their exact one."""
    t = math.floor(stddev) + 1
    s2 = stddev**2

    def draw(k):
        ka, kb, kc = jax.random.split(k, 3)
        geometric = lambda kk: jnp.floor(t * jax.random.exponential(kk, shape))
        y = geometric(ka) - geometric(kb)
        accept = jax.random.uniform(kc, shape) < jnp.exp(-(jnp.abs(y) - s2 / t) ** 2 / (2 * s2))
        return y, accept

    y0, ok0 = draw(jax.random.fold_in(key, 0))

    def body(carry):
        i, y, ok = carry
        y1, ok1 = draw(jax.random.fold_in(key, i))
        return i + 1, jnp.where(ok, y, y1), ok | ok1

    _, y, _ = jax.lax.while_loop(lambda c: ~jnp.all(c[2]), body, (jnp.int32(1), y0, ok0))
    return y.astype(jnp.int32)


def to_signed(ring: jax.Array, bits: int) -> jax.Array:
    """A uint32 sum read modulo 2^bits as a signed integer in [-2^(bits-1), 2^(bits-1))."""
    shift = jnp.uint32(32 - bits)
    return jax.lax.shift_right_arithmetic(
        jax.lax.bitcast_convert_type(ring << shift, jnp.int32), jnp.int32(32 - bits))


def neighbours(graph_key, slot, participants, half: int, max_clients: int):
    """Participant `slot`'s neighbours in the Harary graph H(2 half, n) over the n
    participants laid on a ring in a random order: the ranks `half` places either side of it
    (every other participant when n <= 2 half + 1). Returns (slots i32[2 half], valid)."""
    n = participants
    u = jax.random.uniform(graph_key, (max_clients,))
    order = jnp.argsort(jnp.where(jnp.arange(max_clients) < n, u, 2.0))  # ring position -> slot
    position = jnp.argsort(order)[slot]
    t = jnp.arange(1, half + 1)
    within = t <= (n - 1) // 2
    nb = jnp.concatenate([order[(position + t) % jnp.maximum(n, 1)],
                          order[(position - t) % jnp.maximum(n, 1)]])
    valid = jnp.concatenate([within | (2 * t == n), within])
    return nb, valid


def secagg(clip_norm: float, max_clients: int, *, bits: int = 32, scale: float | None = None,
           degree: int | None = None, threshold: int | None = None, dropout: float = 0.0,
           expected_weight: float | None = None, masks: bool = False,
           noise: Literal["skellam", "discrete_gaussian"] | None = None,
           noise_multiplier: float = 0.0, min_clients: int | None = None,
           dimension: int | None = None, beta: float = math.exp(-0.5)) -> Aggregator:
    """Secure aggregation of clipped, quantized updates in Z_(2^bits), a "sum" reduction
    (module docstring: what is simulated, and how).

    Args:
      clip_norm: each client's update is clipped to this L2 norm first.
      max_clients: the most clients a round holds (the sampler's `max_size`): the ring must
        hold their worst-case sum, and the neighbour graph is drawn over this many slots.
      bits: the ring Z_(2^bits), 2 to 32; a client sends `bits` per coordinate.
      scale: integer levels per unit of the update; default the most that cannot overflow
        (half the ring left for the noise with `noise`), at most 2^22 per clip norm.
      degree: neighbours per client (SecAgg+); default 2 ceil(log2(max_clients)); rounded up
        to even; `max_clients - 1` or more is SecAgg's complete graph.
      threshold: the Shamir threshold, shares needed to rebuild a client's seeds; default
        degree // 2 + 1.
      dropout: each participant's probability of dropping after masking.
      expected_weight: divide the sum by this fixed weight (the expected cohort, as
        `aggregators.dp_mean`; needed with noise); default the realized number of clients
        included.
      masks: generate the pairwise masks (exact cancellation checked, slow); the sum is the
        same without.
      noise: "skellam" or "discrete_gaussian" integer noise added by each client.
      noise_multiplier: the noise's standard deviation over the sensitivity D2, for the
        aggregate of `min_clients` clients.
      min_clients: the fewest surviving clients the noise is calibrated for (default
        `max_clients`); a round with fewer reports `dp_noise_shortfall`.
      dimension: the update's size (all leaves), needed with noise for D2; checked at init.
      beta: conditional rounding's parameter (D2 holds for a plain rounding w.p. 1 - beta).

    Server metrics: "weight_sum" (clients included), "secagg_unrecoverable",
    "secagg_dropped", "secagg_overflow_bound", "secagg_bits_per_client", and with noise
    "dp_noise_shortfall", "noise_stddev"; per client "clipped" and "secagg_dropped".
    """
    clip_norm = check_number("clip_norm", clip_norm, above=0)
    max_clients = check_integer("max_clients", max_clients, 1)
    bits = check_integer("bits", bits, 2, 32)
    masks = check_bool("masks", masks)
    dropout = check_number("dropout", dropout, at_least=0)
    if dropout >= 1:
        raise ValueError(f"dropout is a probability in [0, 1), got {dropout!r}")
    if noise not in (None, "skellam", "discrete_gaussian"):
        raise ValueError(f"noise must be None, 'skellam' or 'discrete_gaussian', got {noise!r}")
    if expected_weight is not None:
        expected_weight = check_number("expected_weight", expected_weight, above=0)
    if noise is not None:
        z = check_number("noise_multiplier", noise_multiplier, above=0)
        if expected_weight is None:
            raise ValueError("distributed DP divides by a fixed expected_weight (the expected "
                             "cohort): dividing by the realized count would leak who took part")
        if dimension is None:
            raise ValueError("distributed DP needs the update's dimension (its sensitivity "
                             "after rounding depends on it): pass dimension=")
        dimension = check_integer("dimension", dimension, 1)
        min_clients = check_integer("min_clients", max_clients if min_clients is None
                                    else min_clients, 1, max_clients)
        beta = check_number("beta", beta, above=0)
        if beta >= 1:
            raise ValueError(f"beta is a probability in (0, 1), got {beta!r}")
    half_ring = 2 ** (bits - 1)
    if scale is None:
        room = half_ring // 2 if noise else half_ring
        per_client = (room - 1) // max_clients - 1  # n (C s + 1) <= room - 1
        if per_client < 1:
            raise ValueError(f"a ring of {bits} bits is too small for {max_clients} clients: "
                             "their sum overflows even at one level per clip norm; raise bits")
        most = float(min(per_client, MAX_LEVELS))
        if noise is not None:
            most = min(most, _levels_for_noise(z, min_clients, dimension, beta))
        scale = most / clip_norm
    scale = check_number("scale", scale, above=0)
    levels = clip_norm * scale
    if levels > MAX_LEVELS:
        raise ValueError(f"scale {scale:g} gives {levels:g} levels per clip norm, past the "
                         f"{MAX_LEVELS:g} whose fractions float32 holds")
    if max_clients * math.ceil(levels) >= half_ring:
        raise ValueError(f"a ring of {bits} bits is too small for {max_clients} clients at "
                         f"scale {scale:g}: {max_clients} clipped updates of up to "
                         f"{math.ceil(levels)} levels sum past 2^{bits - 1}, where the sum "
                         "wraps; lower the scale or raise bits")
    accept = l2 = l1 = local_var = None
    if noise is not None:
        accept = rounded_l2_bound(levels, dimension, beta)
        l2 = accept * (1 + NORM_SLACK)
        l1 = rounded_l1_bound(l2, dimension)
        local_var = (z * l2) ** 2 / min_clients
        if local_var > MAX_NOISE_VARIANCE:
            raise ValueError(f"each client's {noise} noise would have variance {local_var:.3g}, "
                             f"past the {MAX_NOISE_VARIANCE:g} its int32 and float32 sampling "
                             "holds exactly: lower the scale (or leave it to the default)")
    if degree is None:
        degree = 2 * math.ceil(math.log2(max(max_clients, 2)))
    degree = min(check_integer("degree", degree, 1), max(max_clients - 1, 1))
    half = -(-degree // 2)
    if threshold is None:
        threshold = degree // 2 + 1
    threshold = check_integer("threshold", threshold, 1)
    if threshold > max_clients - 1 or threshold > degree:
        raise ValueError(f"the SecAgg threshold {threshold} is larger than the cohort allows: "
                         f"a client of {max_clients} has at most {min(degree, max_clients - 1)} "
                         "neighbours to hold its shares, so no dropout could be recovered")
    ring_mask = jnp.uint32(2**bits - 1)

    def init(template):
        d = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(template))
        if noise is not None and d != dimension:
            raise ValueError(f"secagg was built for dimension={dimension} but the update has "
                             f"{d} entries")
        return ()

    def client(output, weight, ctx, state):
        leaves, treedef = jax.tree.flatten(output)
        n, participant = ctx.participants, ctx.slot >= 0
        slot = jnp.clip(ctx.slot, 0, max_clients - 1)
        cohort = jax.random.fold_in(ctx.cohort_key, _SALT)
        # Computed alike by every client from the cohort's key (unbatched under the vmap).
        dropped_all = ((jax.random.uniform(jax.random.fold_in(cohort, 1), (max_clients,))
                        < dropout) & (jnp.arange(max_clients) < n))
        nb, valid = neighbours(jax.random.fold_in(cohort, 0), slot, n, half, max_clients)
        nb_dropped = valid & dropped_all[nb]
        alive = jnp.sum(valid & ~dropped_all[nb])
        dropped = participant & dropped_all[slot]
        sent = participant & ~dropped
        unrecoverable = participant & ((alive < threshold) | (n > max_clients))

        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
        factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
        own = jax.random.fold_in(ctx.key, _SALT)
        q = stochastic_round([x * factor for x in leaves], jax.random.fold_in(own, 0), scale,
                             accept)
        if noise is not None:
            draw = (skellam_noise if noise == "skellam" else
                    lambda k, s, v: discrete_gaussian_noise(k, s, math.sqrt(v)))
            q = [v + draw(jax.random.fold_in(jax.random.fold_in(own, 1), i), v.shape,
                          local_var) for i, v in enumerate(q)]
        if noise is None:  # |q_i| <= ceil(|y_i|) <= ||y||_2 + 1: no pass of its own
            linf = jnp.floor(jnp.minimum(norm, clip_norm) * scale) + 1.0
        else:
            linf = jnp.max(jnp.stack([jnp.max(jnp.abs(v)) for v in q])).astype(jnp.float32)
        ring = [jax.lax.bitcast_convert_type(v, jnp.uint32) & ring_mask for v in q]
        out = {"included": (sent & (weight > 0)).astype(jnp.int32),
               "survivors": sent.astype(jnp.int32),
               "unrecoverable": unrecoverable.astype(jnp.int32),
               "linf": jnp.where(sent, linf, 0.0)}
        if masks:
            seeds = jax.random.fold_in(cohort, 2)
            left = [jnp.zeros_like(r) for r in ring]
            for j in range(2 * half):
                other = nb[j]
                seed = jax.random.fold_in(jax.random.fold_in(seeds, jnp.minimum(slot, other)),
                                          jnp.maximum(slot, other))
                for i, r in enumerate(ring):
                    m = jnp.where(valid[j], jax.random.bits(jax.random.fold_in(seed, i), r.shape,
                                                            jnp.uint32), jnp.uint32(0))
                    m = jnp.where(slot < other, m, jnp.uint32(0) - m)
                    ring[i] = r + m
                    left[i] = jnp.where(nb_dropped[j], left[i] + m, left[i])
            out["leftover"] = treedef.unflatten(
                [jnp.where(sent, v, jnp.zeros_like(v)) for v in left])
        out["ring"] = treedef.unflatten([jnp.where(sent, r, jnp.zeros_like(r)) for r in ring])
        metrics = {"clipped": norm > clip_norm, "secagg_dropped": dropped}
        return out, participant.astype(jnp.float32), metrics

    def server(reduced, state, key):
        out = reduced.output
        ring = out["ring"]
        if masks:  # the masks survivors hold with dropped neighbours, from the rebuilt seeds
            ring = jax.tree.map(jnp.subtract, ring, out["leftover"])
        failed = out["unrecoverable"] > 0
        included = out["included"]
        denom = (jnp.float32(expected_weight) if expected_weight is not None
                 else jnp.maximum(included, 1).astype(jnp.float32))
        empty = failed | (included == 0) if expected_weight is None else failed
        value = jax.tree.map(
            lambda r: jnp.where(empty, 0.0, to_signed(r, bits).astype(jnp.float32)
                                / (scale * denom)), ring)
        d = sum(x.size for x in jax.tree.leaves(ring))
        metrics = {"weight_sum": included.astype(jnp.float32),
                   "secagg_unrecoverable": out["unrecoverable"],
                   "secagg_dropped": reduced.weight.astype(jnp.int32) - out["survivors"],
                   "secagg_overflow_bound": out["linf"] / float(half_ring),
                   "secagg_bits_per_client": jnp.float32(bits * d)}
        if noise is not None:
            metrics["dp_noise_shortfall"] = jnp.maximum(min_clients - out["survivors"], 0)
            metrics["noise_stddev"] = jnp.float32(noise_multiplier * l2 / (scale
                                                                           * expected_weight))
        return value, state, metrics

    privacy = None
    if noise is not None:
        def privacy(participation, rounds):
            import dp_accounting

            if participation.kind not in ("poisson", "fixed", "cyclic"):
                raise ValueError(f"no accountant for participation {participation.kind!r}")
            times = (participations(participation, rounds) if participation.kind == "cyclic"
                     else rounds)
            f = 2.0 if participation.kind == "fixed" else 1.0  # replace one: x - x'
            if noise == "skellam":
                mu = min_clients * local_var
                return _rdp_curve(times, f * l2, f * l1, mu)
            rho = ddg_rho(f * l2, f * l1, math.sqrt(local_var), min_clients, dimension)
            return dp_accounting.SelfComposedDpEvent(dp_accounting.ZCDpEvent(rho), times)

    return stage("secagg", init=init, client=client, server=server, reduction="sum",
                 privacy=privacy)


def _levels_for_noise(z, min_clients, dimension, beta) -> float:
    """The most levels per clip norm whose clients' noise stays within MAX_NOISE_VARIANCE."""
    target = math.sqrt(MAX_NOISE_VARIANCE * min_clients) / z / (1 + NORM_SLACK)  # largest D2
    if rounded_l2_bound(1.0, dimension, beta) > target:
        raise ValueError(f"noise_multiplier {z:g} over {min_clients} clients of dimension "
                         f"{dimension} needs per-client noise past {MAX_NOISE_VARIANCE:g} "
                         "even at one level per clip norm")
    lo, hi = 1.0, target
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rounded_l2_bound(mid, dimension, beta) <= target else (lo, mid)
    return math.floor(lo)


def _rdp_curve(times, l2, l1, variance):
    return RdpCurve(SKELLAM_ORDERS, tuple(times * skellam_rdp(a, l2, l1, variance)
                                          for a in SKELLAM_ORDERS))
