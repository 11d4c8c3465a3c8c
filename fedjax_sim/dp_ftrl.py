"""DP-FTRL: the noised mean with noise correlated across rounds (matrix factorization).

The server releases, over rounds, the prefix sums `A x` of the clients' clipped sums `x_t`
(`A` lower-triangular ones). A factorization `A = B C` gives the mechanism `B (C x + z)`,
`z ~ N(0, (noise_multiplier * clip_norm)^2 I)`, whose privacy is that of the Gaussian
mechanism `C x + z`: sensitivity `||C u||` over the participation patterns `u` the sampler
allows. Its rounds need not release prefix sums: round t adds to the sum the noise on
increments `(C^{-1} z)_t`, so the server's running sum of noised aggregates is `A x + B z`,
and a server SGD on them is DP-FTRL (any server optimizer is post-processing of
`C^{-1}(C x + z)`). `dp_ftrl_mean` is that reduction stage; the generator of `C^{-1} z` is a
`jax_privacy.matrix_factorization.StreamingMatrix` whose buffers are the stage's state (the
round's i.i.d. draw comes from the round's key: the same on every device, and the state is
a pytree of arrays, checkpointed with the server state).

Three mechanisms (`mechanism(kind, rounds, min_sep)`):
- "tree": tree aggregation restarted every `min_sep` rounds (Kairouz et al., "Practical and
  Private (Deep) Learning without Sampling or Shuffling", ICML 2021, DP-FTRL-TreeRestart):
  a prefix sum is the sum of its binary decomposition's nodes; only the node ending at round
  t is ever used, so round t draws one node's noise and returns it minus the nodes it
  completes. Built here from the paper (jax-privacy has no tree).
- "banded": the banded Toeplitz strategy of `min_sep` bands optimized for total prefix-sum
  error (Choquette-Choo et al., "(Amplified) Banded Matrix Factorization: A unified approach
  to private training", NeurIPS 2023), by `jax_privacy.matrix_factorization.toeplitz`.
- "blt": a buffered linear Toeplitz strategy optimized for `min_sep` participation
  (Dvijotham et al., "Efficient and Near-Optimal Noise Generation for Streaming Differential
  Privacy", FOCS 2024; McMahan, Xu and Zhang, "A Hassle-free Algorithm for Private Learning
  in Practice: Don't Use Tree Aggregation, Use BLTs", EMNLP 2024, arXiv:2408.08868), by
  `jax_privacy.matrix_factorization.buffered_toeplitz`; its buffers make the noise O(d *
  buffers) per round, as banded's O(d * bands) (McKenna, "Scaling up the Banded Matrix
  Factorization Mechanism for Large Scale Private Training", 2024).

Accounting covers cyclic participation (`fs.sampling.cyclic`: each client once every
`b = N // cohort_size` rounds, `k = ceil(rounds / b)` times): the sensitivity of `C` under
(k, b)-min-separation is jax-privacy's (`toeplitz.minsep_sensitivity_squared`, exact for the
non-negative, non-increasing Toeplitz strategies; for the tree, each participation in its
own tree: `k` times a tree's largest column norm squared, `single_participation_sensitivity`),
tabulated for every round count at once (jax-privacy's functions compile anew for each
matrix size; the tests check every entry against them), and the run is the one
Gaussian event `GaussianDpEvent(noise_multiplier / sensitivity)` (jax-privacy's
`SingleReleaseTrainingAccountant`). Poisson and fixed-size sampling are refused: no
separation bound holds, and jax-privacy's amplification for matrix mechanisms
(`DpsgdTrainingAccountant` with `cycle_length`) assumes cyclic Poisson sampling within
fixed groups, which no fedjax_sim sampler draws.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.aggregators import (
    Aggregator,
    _accumulate,
    _accumulator,
    gaussian_noise,
    stage,
)
from fedjax_sim.checks import check_integer, check_number
from fedjax_sim.privacy import check_delta
from fedjax_sim.sampling import Participation

Kind = Literal["tree", "banded", "blt"]


class Mechanism(NamedTuple):
    """A factorization `A = B C` of `rounds` prefix sums, as DP-FTRL runs it.

    Attributes:
      name: "tree", "banded" or "blt".
      rounds: the rounds it is built (optimized, tabulated and accounted) for.
      min_sep: the separation it is built for (the tree's restart period, the bands, the
        separation the BLT is optimized for).
      noising: `C^{-1}` as a jax-privacy `StreamingMatrix`: i.i.d. noise in, round by round,
        the noise on increments out.
      increment_stddev: `[rounds]`, round t's noise stddev per unit of i.i.d. noise (the
        norm of row t of `C^{-1}`).
      sensitivity: `(b, r) -> float`, the L2 sensitivity of `C`'s first r rounds per unit
        of clip norm when a client takes part at most once every b rounds.
    """

    name: str
    rounds: int
    min_sep: int
    noising: Any
    increment_stddev: np.ndarray
    sensitivity: Callable[[int, int], float]

    def event(self, noise_multiplier: float, participation: Participation, rounds: int):
        """The dp-accounting event of the first `rounds` rounds under `participation`."""
        import dp_accounting

        z = check_number("noise_multiplier", noise_multiplier, at_least=0)
        rounds = check_integer("rounds", rounds, 1)
        if rounds > self.rounds:
            raise ValueError(f"the {self.name} mechanism was built for {self.rounds} rounds, "
                             f"not {rounds}: build it for the rounds the run takes")
        b = separation(participation)
        return dp_accounting.GaussianDpEvent(z / self.sensitivity(b, rounds))


def separation(participation: Participation) -> int:
    """The fewest rounds between two of one client's participations: `N // size` for a
    cyclic sampler; ValueError for a sampler that guarantees none."""
    if not isinstance(participation, Participation):
        raise TypeError(f"participation must be a fs.sampling.Participation, got "
                        f"{type(participation).__name__}")
    if participation.kind != "cyclic":
        raise ValueError(
            f"DP-FTRL's accounting needs each client at most once every b rounds "
            f"(fs.sampling.cyclic); {participation.kind!r} participation guarantees no "
            f"separation (jax-privacy amplifies matrix mechanisms only under cyclic Poisson "
            f"sampling within fixed groups, which no fs sampler draws)")
    return max(1, participation.num_clients // int(participation.size))


def mechanism(kind: Kind, rounds: int, min_sep: int, *, bands: int | None = None,
              strategy: Any = None) -> Mechanism:
    """Builds a DP-FTRL mechanism for `rounds` rounds of clients at least `min_sep` apart
    (`N // cohort_size` for `fs.sampling.cyclic`).

    Args:
      kind: "tree" (restarted every `min_sep` rounds), "banded" or "blt".
      rounds: the number of rounds (the matrix size; the accounting refuses more).
      min_sep: the separation the strategy is built for.
      bands: "banded" only: the number of bands, default `min(min_sep, rounds)`.
      strategy: the strategy to use instead of optimizing one: for "banded" its Toeplitz
        coefficients (non-negative, non-increasing, one per band), for "blt" a
        `jax_privacy.matrix_factorization.buffered_toeplitz.BufferedToeplitz` (optimizing
        one takes about 20 s on a CPU).

    Example:
      >>> mech = mechanism("tree", rounds=100, min_sep=10)   # doctest: +SKIP
    """
    rounds = check_integer("rounds", rounds, 1)
    min_sep = check_integer("min_sep", min_sep, 1)
    if kind not in ("tree", "banded", "blt"):
        raise ValueError(f"mechanism must be 'tree', 'banded' or 'blt', got {kind!r}")
    if bands is not None and kind != "banded":
        raise ValueError(f"bands is for the banded mechanism, not {kind!r}")
    if strategy is not None and kind == "tree":
        raise ValueError("the tree mechanism takes no strategy")
    if kind == "tree":
        return _tree(rounds, min_sep)
    if kind == "banded":
        if strategy is not None:
            if bands is not None:
                raise ValueError("give bands or a strategy (its coefficients), not both")
            bands = len(strategy)
        bands = check_integer("bands", min(min_sep, rounds) if bands is None else bands, 1,
                              rounds)
        return _banded(rounds, min_sep, bands, strategy)
    return _blt(rounds, min_sep, strategy)


def _finish(name, rounds, min_sep, noising, sensitivity) -> Mechanism:
    stddev = np.sqrt(np.asarray(noising.row_norms_squared(rounds), np.float64))
    return Mechanism(name, rounds, min_sep, noising, stddev, sensitivity)


def _toeplitz_sensitivity(coefs: jax.Array) -> Callable[[int, int], float]:
    """Exact (k, b)-min-sep sensitivity of a non-negative, non-increasing Toeplitz strategy
    (Kalinin and Lampert, "Banded Square Root Matrix Factorization for Differentially Private
    Model Training", NeurIPS 2024, arXiv:2405.13763, Theorem 2): the worst client takes part
    at rounds 0, b, 2b, ..., so `||C u||^2` over the first r rounds is the sum over t < r of
    `(sum_{j <= t, j = t mod b} c_j)^2`, a prefix of one vector. A Ledger asks after every
    round, and jax-privacy's `toeplitz.minsep_sensitivity_squared` compiles anew for each
    matrix size (0.2-0.5 s a round), so the prefixes are tabulated once per b, and each
    prefix is checked against that function by the tests."""
    coefs = np.asarray(coefs, np.float64)

    @functools.lru_cache
    def table(b):
        padded = np.pad(coefs, (0, -len(coefs) % b))
        column = np.cumsum(padded.reshape(-1, b), axis=0).ravel()[:len(coefs)]
        return np.cumsum(column ** 2)

    def sensitivity(b, r):
        return float(np.sqrt(table(b)[r - 1]))

    return sensitivity


def _banded(rounds: int, min_sep: int, bands: int, strategy) -> Mechanism:
    from jax_privacy.matrix_factorization import toeplitz

    if strategy is None:  # unit norm: sensitivity sqrt(k) when bands <= separation
        coef = toeplitz.optimize_banded_toeplitz(rounds, bands)
    else:
        coef = np.asarray(strategy, np.float32)
        if coef.ndim != 1 or not np.all(np.isfinite(coef)) or not np.all(coef >= 0) or \
                np.any(np.diff(coef) > 0) or coef[0] <= 0:
            raise ValueError("a banded strategy is its Toeplitz coefficients, finite, "
                             "non-negative, non-increasing and the first > 0; got "
                             f"{strategy!r}"[:300])
        coef = jnp.asarray(coef)
    # Not column-normalized for `rounds`: the banded Toeplitz C stays exact for any r.
    noising = toeplitz.inverse_as_streaming_matrix(coef)
    return _finish("banded", rounds, min_sep, noising,
                   _toeplitz_sensitivity(toeplitz.pad_coefs_to_n(coef, rounds)))


def _blt(rounds: int, min_sep: int, strategy) -> Mechanism:
    from jax_privacy.matrix_factorization import buffered_toeplitz as bt

    if strategy is None:
        strategy = bt.optimize(n=rounds, min_sep=min_sep, max_participations=None,
                               error="mean")
    elif not isinstance(strategy, bt.BufferedToeplitz):
        raise TypeError(f"strategy must be a jax_privacy BufferedToeplitz, got "
                        f"{type(strategy).__name__}")
    # The noise runs in float32 (no x64 needed); the accounting is of these float32 params.
    blt = bt.BufferedToeplitz.build(np.asarray(strategy.buf_decay, np.float32),
                                    np.asarray(strategy.output_scale, np.float32),
                                    dtype=jnp.float32)
    return _finish("blt", rounds, min_sep, blt.inverse_as_streaming_matrix(),
                   _toeplitz_sensitivity(blt.toeplitz_coefs(rounds)))


def _tree(rounds: int, period: int) -> Mechanism:
    """Tree aggregation restarted every `period` rounds (Kairouz et al. 2021, Section 3 and
    Appendix D): position t (1-based) in a tree uses the node of level `ctz(t)` ending at t;
    the prefix sum at t is the sum of the nodes of t's set bits."""
    from jax_privacy.matrix_factorization import streaming_matrix

    depth = period.bit_length()  # levels of a tree of `period` leaves

    def init(value):
        zero = jnp.zeros_like(value)
        return jnp.int32(0), jnp.broadcast_to(zero, (depth, *zero.shape))

    def next_noise(z, state):
        index, nodes = state
        t = index % period + 1
        level = 31 - jax.lax.clz(t & -t)  # trailing zeros of t
        levels = jnp.arange(depth).reshape((-1,) + (1,) * z.ndim)
        nodes = jnp.where(t == 1, jnp.zeros_like(nodes), nodes)  # a new tree
        # The nodes below `level` are t - 1's lowest ones, replaced by the new node.
        done = levels < level
        increment = z - jnp.sum(jnp.where(done, nodes, 0), axis=0)
        nodes = jnp.where(levels == level, z[None], jnp.where(done, 0, nodes))
        return increment.astype(z.dtype), (index + 1, nodes)

    noising = streaming_matrix.StreamingMatrix.from_array_implementation(init, next_noise)
    one_tree = np.linalg.inv(np.asarray(noising.materialize(min(period, rounds)), np.float64))

    # One participation's sensitivity in a tree of each width: the largest column norm of
    # its leading block (jax-privacy's single_participation_sensitivity, which compiles
    # anew for each width; the tests compare the two), tabulated for the Ledger's rounds.
    column_norms = np.sqrt(np.cumsum(one_tree ** 2, axis=0))
    one_participation = [float(column_norms[w - 1, :w].max())
                         for w in range(1, len(one_tree) + 1)]

    def sensitivity(b, r):
        if b < period:
            raise ValueError(f"the tree restarts every {period} rounds and needs each client "
                             f"at most once per tree; this sampler lets a client back after "
                             f"{b} rounds: build the tree with min_sep <= {b}")
        # Each participation falls in its own tree, where it moves at most a tree's
        # largest column norm of nodes (the first leaf's: floor(log2 width) + 1 of them).
        return math.sqrt(math.ceil(r / b)) * one_participation[min(period, r) - 1]

    return _finish("tree", rounds, period, noising, sensitivity)


class FtrlState(NamedTuple):
    """The stage's state: rounds run, and the noise generator's buffers (per leaf)."""

    round: jax.Array
    noise: Any


def dp_ftrl_mean(noise_multiplier: float, clip_norm: float, expected_weight: float,
                 mech: Mechanism) -> Aggregator:
    """DP-FTRL's noised mean: `(sum_c w_c o_c + s (C^{-1} z)_t) / W`, `s = noise_multiplier *
    clip_norm`, `z` i.i.d. standard normal from the round's key, `C^{-1}` the mechanism's
    noising matrix (its buffers the stage state), `W = expected_weight` fixed in advance.

    Its guarantee needs `clip(clip_norm)` before it, uniform client weights, and a sampler
    with the separation the accounting reads (`fs.sampling.cyclic`); its `privacy` refuses
    others, and more rounds than the mechanism was built for (the noise stream itself would
    go on: Toeplitz, or trees restarted). Reports "noise_stddev" (round t's per-coordinate
    stddev of the added noise over W) and "weight_sum".

    Example:
      >>> mech = mechanism("blt", rounds=200, min_sep=10)   # doctest: +SKIP
      >>> agg = chain(clip(1.0), weight_by("uniform"), dp_ftrl_mean(2.0, 1.0, 100, mech))
    """
    z = check_number("noise_multiplier", noise_multiplier, at_least=0)
    c = check_number("clip_norm", clip_norm, above=0)
    expected = check_number("expected_weight", expected_weight, above=0)
    if not isinstance(mech, Mechanism):
        raise TypeError(f"mech must be a fs.dp_ftrl.Mechanism (fs.dp_ftrl.mechanism(...)), "
                        f"got {type(mech).__name__}")
    stddev = jnp.asarray(mech.increment_stddev, jnp.float32)

    def init(template):
        zeros = jax.tree.map(lambda t: jnp.zeros(jnp.shape(t), _accumulator(t.dtype)),
                             template)
        return FtrlState(jnp.int32(0), mech.noising.init_multiply(zeros))

    def server(reduced, state, key):
        draws = gaussian_noise(key, reduced.output, z * c)
        noise, generator = mech.noising.multiply_next(draws, state.noise)
        value = jax.tree.map(lambda s, n: (s + n) / expected, reduced.output, noise)
        t = jnp.minimum(state.round, mech.rounds - 1)
        return value, FtrlState(state.round + 1, generator), {
            "weight_sum": reduced.weight, "noise_stddev": z * c * stddev[t] / expected}

    def privacy(participation, rounds):
        return mech.event(z, participation, rounds)

    return stage("dp_ftrl_mean", client=_accumulate, server=server, init=init,
                 reduction="sum", privacy=privacy)


def noise_multiplier_for(mech: Mechanism, target_epsilon: float,
                         participation: Participation, rounds: int, delta: float) -> float:
    """The smallest noise multiplier whose `rounds` rounds under `participation` stay within
    (`target_epsilon`, `delta`), by dp-accounting's PLD accountant and calibration."""
    import dp_accounting

    target = check_number("target_epsilon", target_epsilon, above=0)
    delta = check_delta(delta)
    mech.event(1.0, participation, rounds)  # refuses what it cannot account for, now
    return float(dp_accounting.calibrate_dp_mechanism(
        dp_accounting.pld.PLDAccountant, lambda z: mech.event(z, participation, rounds),
        target, delta))
