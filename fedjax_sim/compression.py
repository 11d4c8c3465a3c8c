"""Update compression as aggregation-chain stages: each client encodes its update, the server
decodes.

Every member is an `fs.aggregators` stage placed before a "sum" reduction (`mean`,
`dp_mean`, `fs.secagg.secagg`), after any clip and the client weighting:

  >>> agg = aggregators.chain(aggregators.weight_by("uniform"), quantize(8), aggregators.mean())

Where decoding is linear and per client (quantization's `lo + step q`, a sparse vector's
scatter, DRIVE's scale and inverse rotation), the client's lane decodes before the streamed
sum: it is the arithmetic the server would do on each client's message, and the sum then
holds one decoded update per chunk instead of every client's message. Where the cohort shares
the code (`hadamard_rotation`: one rotation per round), the server decodes once, after the
sum. Per-client randomness comes from the aggregator's per-client key (`ctx.key`), so a
round's bits do not depend on K or the device count.

Each stage reports its upload (`Aggregator.upload_bits`: bits per client for a given number
of parameters), which `Simulation` writes into every round's record ("uplink_bits").

References:
  Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and
    Encoding", NeurIPS 2017.
  Suresh, Yu, Kumar, McMahan, "Distributed Mean Estimation with Limited Communication",
    ICML 2017 (stochastic k-level quantization, randomized Hadamard rotation).
  Vargaftik et al., "DRIVE: One-bit Distributed Mean Estimation", NeurIPS 2021.
  Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018.
  Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient Compression
    Schemes", ICML 2019.
  Bernstein et al., "signSGD with Majority Vote is Communication Efficient and Fault
    Tolerant", ICLR 2019.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sim.aggregators import Aggregator, stage
from fedjax_sim.secagg import dither

_SALT = 0xC0DE  # folded into the client's key: this module's own stream

FLOAT_BITS = 32  # a scale, a norm or an uncompressed entry


def _flatten(tree) -> jax.Array:
    """All leaves as one float32 vector, in `jax.tree.leaves` order."""
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def _unflatten(flat: jax.Array, like):
    leaves, treedef = jax.tree.flatten(like)
    out, at = [], 0
    for x in leaves:
        out.append(flat[at:at + x.size].reshape(x.shape).astype(x.dtype))
        at += x.size
    return jax.tree.unflatten(treedef, out)


def _padded(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= bits <= 32:
        raise ValueError(f"bits must be an integer in [1, 32], got {bits!r}")
    return int(bits)


def fwht(x: jax.Array) -> jax.Array:
    """The orthonormal fast Walsh-Hadamard transform `H x / sqrt(n)` of a vector whose length
    n is a power of two: log2(n) butterfly passes, O(n log n). Its own inverse."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    # The widest butterflies first: each pass then pairs two contiguous halves of every
    # block, 3.3x faster per client than the narrowest first (the 159,010-entry W1 update,
    # K = 8, 2-core CPU); the passes commute, so the transform is the same.
    h = n // 2
    while h >= 1:
        y = x.reshape(-1, 2, h)
        x = jnp.stack([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=1).reshape(n)
        h //= 2
    return x / jnp.sqrt(jnp.float32(n))


def _signs(key, n: int) -> jax.Array:
    # A hash of the indices (`secagg.dither`), not threefry: 0.06 against 2.1 ms per client
    # for W1's 262,144 padded entries.
    return jnp.where(dither(key, (n,)) < 0.5, 1.0, -1.0).astype(jnp.float32)


def rotate(flat: jax.Array, key) -> jax.Array:
    """The randomized Hadamard rotation `H D x / sqrt(n)` of `flat` zero-padded to a power of
    two n, D a diagonal of random signs from `key` (Suresh et al. 2017)."""
    n = _padded(flat.shape[0])
    return fwht(_signs(key, n) * jnp.pad(flat, (0, n - flat.shape[0])))


def unrotate(rotated: jax.Array, key, size: int) -> jax.Array:
    """`rotate`'s inverse `D H y / sqrt(n)`, cut back to the first `size` entries."""
    return (_signs(key, rotated.shape[0]) * fwht(rotated))[:size]


def quantize_vector(x: jax.Array, bits: int, key) -> jax.Array:
    """Min-max stochastic uniform quantization of `x` to `2^bits` levels, decoded: each entry
    rounds to one of its two neighbouring levels of the grid `lo + step * j` (lo, hi the
    vector's min and max, step `(hi - lo) / (2^bits - 1)`) with the probability that makes it
    unbiased; per entry the variance is at most step^2 / 4 (Suresh et al. 2017, Section 2).
    Above 24 bits the grid is finer than float32 resolves near `hi`: still unbiased to float
    rounding."""
    return _quantize_leaves([x], bits, key)[0]


def _quantize_leaves(leaves, bits: int, key) -> list:
    """`quantize_vector` over the leaves as one vector, leaf by leaf (no concatenated copy).
    The draws are `secagg.dither`'s hash of the indices: threefry cost 1 ms per client for
    W1's update, more than the client's whole share of a FedAvg round."""
    levels = float(2 ** bits - 1)
    x32 = [x.astype(jnp.float32) for x in leaves]
    full = [x for x in x32 if x.size]  # (a rotation's zero-size shape carriers)
    lo = jnp.min(jnp.stack([jnp.min(x) for x in full]))
    span = jnp.max(jnp.stack([jnp.max(x) for x in full])) - lo
    inv = jnp.where(span > 0, levels / jnp.where(span > 0, span, 1.0), 0.0)
    out = []
    for i, x in enumerate(x32):
        t = (x - lo) * inv
        low = jnp.floor(t)
        up = dither(jax.random.fold_in(key, i), x.shape) < t - low
        q = jnp.minimum(low + up, levels)
        out.append(lo + q * (span / levels))
    return out


def quantize(bits: int) -> Aggregator:
    """Stochastic uniform quantization of each client's whole update (all leaves as one
    vector) to `bits` bits per entry between its min and max, unbiased (`quantize_vector`;
    Suresh et al. 2017's stochastic k-level quantization with k = 2^bits; QSGD, Alistarh et
    al. 2017, is its norm-scaled relative). Decoded in the client's lane (`lo + step q`,
    linear). Upload: `bits` per entry plus min and max as two floats. After
    `hadamard_rotation` it quantizes the rotated vector, whose spread is far smaller.

    Example:
      >>> agg = aggregators.chain(aggregators.weight_by("uniform"), quantize(4),
      ...                         aggregators.mean())
    """
    bits = _check_bits(bits)

    def client(output, weight, ctx, state):
        key = jax.random.fold_in(jax.random.fold_in(ctx.key, _SALT), 0)
        leaves, treedef = jax.tree.flatten(output)
        return jax.tree.unflatten(treedef, _quantize_leaves(leaves, bits, key)), weight, {}

    return stage("quantize", client=client,
                 upload_bits=lambda n: bits * n + 2 * FLOAT_BITS)


def hadamard_rotation(seed: int = 0) -> Aggregator:
    """The randomized Hadamard rotation (Suresh et al. 2017, Section 4) of every client's
    whole update before the stages after it (`quantize`), undone once on the server after the
    sum: the rotation is linear and the cohort shares it within a round, so the mean of the
    rotated updates rotates back to the mean of the updates. The update is zero-padded to a
    power of two n (O(n log n) per client) and the padded length is what is sent.

    The round's random signs live in this stage's server state (a key's data): the server
    draws the next round's from its round key, so they change every round and follow the
    run's seed; `seed` gives the first round's. Needs a "sum" reduction after it.

    Example:
      >>> agg = aggregators.chain(aggregators.weight_by("uniform"), hadamard_rotation(),
      ...                         quantize(2), aggregators.mean())
    """
    def init(template):
        return jax.random.key_data(jax.random.key(seed))

    def client(output, weight, ctx, state):
        # The zero-size leaves carry the update's shapes to the server through the sum.
        shapes = jax.tree.map(lambda x: jnp.zeros(x.shape + (0,), jnp.float32), output)
        return {"rotated": rotate(_flatten(output), jax.random.wrap_key_data(state)),
                "shapes": shapes}, weight, {}

    def server(value, state, key):
        like = jax.tree.map(lambda s: jnp.zeros(s.shape[:-1], s.dtype), value["shapes"])
        size = sum(x.size for x in jax.tree.leaves(like))
        flat = unrotate(value["rotated"], jax.random.wrap_key_data(state), size)
        return _unflatten(flat, like), jax.random.key_data(jax.random.fold_in(key, _SALT)), {}

    return stage("hadamard_rotation", init=init, client=client, server=server,
                 upload_bits=lambda n: FLOAT_BITS * _padded(n))


def drive(unbiased: bool = True) -> Aggregator:
    """DRIVE (Vargaftik et al. 2021): one bit per entry of the client's randomly rotated
    update `y = R x` (`rotate`, its own random signs from the client's key), sent as
    `sign(y)` and one scale S; decoded as `R^-1 (S sign(y))`. S = `||x||^2 / ||y||_1` is the
    unbiased variant (their Section 4.2, unbiased exactly for a uniform random rotation and
    within sampling error for the randomized Hadamard one, as the paper measured);
    `unbiased=False` takes S = `||y||_1 / n`, the least-squares scale. A per-client rotation
    (not the cohort's) makes the clients' errors independent, so the mean's error falls with
    the cohort; each lane decodes its own client (a second O(n log n) transform). Upload:
    one bit per entry of the padded length plus S.

    Example:
      >>> agg = aggregators.chain(aggregators.weight_by("uniform"), drive(),
      ...                         aggregators.mean())
    """
    def client(output, weight, ctx, state):
        key = jax.random.fold_in(jax.random.fold_in(ctx.key, _SALT), 1)
        x = _flatten(output)
        y = rotate(x, key)
        l1 = jnp.sum(jnp.abs(y))
        if unbiased:
            scale = jnp.where(l1 > 0, jnp.sum(x * x) / jnp.where(l1 > 0, l1, 1.0), 0.0)
        else:
            scale = l1 / y.shape[0]
        decoded = unrotate(scale * jnp.where(y >= 0, 1.0, -1.0), key, x.shape[0])
        return _unflatten(decoded, output), weight, {}

    return stage("drive", client=client, upload_bits=lambda n: _padded(n) + FLOAT_BITS)


def _top_k_count(n: int, k: int | None, fraction: float | None) -> int:
    return min(n, k if k is not None else max(1, math.ceil(fraction * n)))


SAMPLE = 4096  # entries a threshold is estimated from (`top_k(exact=False)`)


def top_k(fraction: float | None = None, *, k: int | None = None,
          error_feedback: bool = True, exact: bool = True) -> Aggregator:
    """Top-k sparsification: each client sends the k entries of its update largest in
    magnitude (`k`, or `ceil(fraction * entries)`), as k values and k indices.

    With `error_feedback` (Stich et al. 2018; Karimireddy et al. 2019) each client keeps the
    residual e of what it did not send in the client store (`Aggregator.client_state`):
    it sends `top_k(x + e)` and keeps `e <- x + e - sent`, so nothing is lost, only delayed.
    A client that does not count this round (weight 0: excluded as not finite, or no step)
    keeps its old residual. Needs an algorithm that carries a stage's per-client state (the
    FedOpt family: `fedopt`, `fedavg`, `fedprox`).

    The entries are chosen exactly (`lax.top_k`; among equal magnitudes the lower index);
    the decoded update is the dense vector with the k entries in place (in the lane: the
    server's scatter of each message). Upload: k values (32 bits) and k indices of
    `ceil(log2 entries)` bits. On XLA:CPU the exact choice costs about a W1 client's whole
    round share (1.2 ms for k = 1,590 of 159,010); `exact=False` keeps every entry at or
    above a threshold estimated from `SAMPLE` evenly strided entries (their top
    `k * SAMPLE / entries`), about k entries (1,261-2,126 for k = 1,590 on Gaussian
    vectors), reported per client as "topk_sent"; its upload is accounted at k.

    Example:
      >>> agg = aggregators.chain(aggregators.weight_by("uniform"), top_k(0.01),
      ...                         aggregators.mean())
    """
    if (k is None) == (fraction is None):
        raise ValueError("top_k takes one of fraction (in (0, 1]) or k (>= 1)")
    if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
        raise ValueError(f"top_k's k must be an integer >= 1, got {k!r}")
    if fraction is not None and (isinstance(fraction, bool)
                                 or not isinstance(fraction, numbers.Real)
                                 or not 0 < fraction <= 1):
        raise ValueError(f"top_k's fraction must be in (0, 1], got {fraction!r}")

    def sparsify(v):
        n = v.shape[0]
        count = _top_k_count(n, k, fraction)
        if exact:
            _, idx = lax.top_k(jnp.abs(v), count)
            return jnp.zeros_like(v).at[idx].set(v[idx])
        a = jnp.abs(v)
        m = min(n, SAMPLE)
        sample = a[::n // m][:m]
        # The min of top_k's values, not its last one: XLA:CPU turns an indexed top_k
        # result into a full sort (80-97 ms per client for W1's update).
        threshold = jnp.min(lax.top_k(sample, max(1, round(count * m / n)))[0])
        return jnp.where(a >= threshold, v, 0.0)

    def client(output, weight, ctx, state):
        x = _flatten(output)
        v = x + ctx.state if error_feedback else x
        sent = sparsify(v)
        metrics = {} if exact else {"topk_sent": jnp.sum(sent != 0, dtype=jnp.int32)}
        if not error_feedback:
            return _unflatten(sent, output), weight, metrics
        return (_unflatten(sent, output), weight, metrics,
                jnp.where(weight > 0, v - sent, ctx.state))

    def upload_bits(n):
        count = _top_k_count(n, k, fraction)
        return count * (FLOAT_BITS + max(1, math.ceil(math.log2(n))))

    residual = None
    if error_feedback:
        def residual(template):  # flat, as the client works on it: no copy in or out
            return jnp.zeros(sum(x.size for x in jax.tree.leaves(template)), jnp.float32)

    return stage("top_k", client=client, client_state=residual, upload_bits=upload_bits)


def sign_sgd() -> Aggregator:
    """signSGD with majority vote (Bernstein et al. 2019): each client sends the sign of
    every entry of its update (one bit each), and the server takes the sign of the vote, the
    weighted mean of the signs, decoded after the sum. The server optimizer's learning rate
    is then the step: server SGD at rate eta moves every parameter by eta against the
    majority's sign (uniform weights give the paper's one vote per client). Upload: one bit
    per entry.

    Example:
      >>> agg = aggregators.chain(aggregators.weight_by("uniform"), sign_sgd(),
      ...                         aggregators.mean())
    """
    def client(output, weight, ctx, state):
        return jax.tree.map(lambda o: jnp.sign(o).astype(jnp.float32), output), weight, {}

    def server(value, state, key):
        return jax.tree.map(jnp.sign, value), state, {}

    return stage("sign_sgd", client=client, server=server, upload_bits=lambda n: n)


def upload_bits(aggregator: Aggregator | None, num_params: int) -> int:
    """Bits one client uploads for `num_params` entries under `aggregator` (32 per entry
    where no stage encodes)."""
    f = getattr(aggregator, "upload_bits", None)
    return FLOAT_BITS * num_params if f is None else int(f(num_params))


def by_name(name: str, *, bits: int = 8, topk_fraction: float = 0.01) -> list[Aggregator]:
    """The stages of a compressor by the CLI's name (none, quantize, hadamard, eden, topk,
    sign), to go between the client weighting and the reduction; "hadamard" is the rotation
    before `quantize(bits)`, "eden" is one-bit `drive()` (EDEN's one-bit case)."""
    makers = {"none": lambda: [], "quantize": lambda: [quantize(bits)],
              "hadamard": lambda: [hadamard_rotation(), quantize(bits)],
              "eden": lambda: [drive()], "topk": lambda: [top_k(topk_fraction)],
              "sign": lambda: [sign_sgd()]}
    if name not in makers:
        raise ValueError(f"compression must be one of {sorted(makers)}, got {name!r}")
    return makers[name]()
