"""Privacy accounting: the user-level (epsilon, delta) a run has spent, computed by Google's
dp-accounting (RDP or PLD accountant), never by hand.

A DP stage of the aggregation chain (`aggregators.dp_mean`, ...) carries its `privacy`: a
function `(participation, rounds) -> DpEvent`, the dp-accounting event of that many rounds
under the sampler's `fs.sampling.Participation`. A `Ledger` turns it into epsilon at a delta,
round by round; `Simulation` keeps one whenever its chain has a DP stage, and refuses a
sampler no accountant covers.

DP-FedAvg's round is one Gaussian mechanism at the user level: the clipped update has
sensitivity `clip_norm`, the sum gets noise of standard deviation `noise_multiplier *
clip_norm`, amplified by the sampling (Poisson: add or remove one client; a fixed-size
cohort: replace one, RDP only). Install with `pip install "fedjax_sim[privacy]"`.

Two guarantees are a client's own rather than the released model's, so no `Ledger` accounts
them: local DP (`aggregators.local_dp`; `local_epsilon`) and example-level DP-SGD inside the
local steps (`fs.algorithms.ExampleDP`; `example_epsilon`). Both are stated under replacement
(one client's update by any other; one example by any other), so a sum of terms clipped to C
moves by 2C per replaced term and the events carry that sensitivity in their noise
multipliers (z / 2 per term), and neither is amplified by sampling: the server sees who took
part, and a client's batches are shuffled epochs, not Poisson samples.
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import numpy as np

from fedjax_sim.checks import check_integer, check_number
from fedjax_sim.data.cohort import Batching
from fedjax_sim.sampling import Participation

Accountant = Literal["pld", "rdp"]
EventFn = Callable[[Participation, int], Any]  # (participation, rounds) -> dp_accounting.DpEvent


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as e:
        raise ImportError("privacy accounting needs dp-accounting: pip install "
                          "'fedjax_sim[privacy]' (or pip install dp-accounting)") from e
    return dp_accounting


def check_delta(delta) -> float:
    """`delta` as a float in (0, 1), else a ValueError naming it."""
    delta = check_number("delta", delta, above=0)
    if delta >= 1:
        raise ValueError(f"delta must be < 1 (typically below 1 / population), got {delta!r}")
    return delta


def _check_accountant(accountant) -> None:
    if accountant not in ("pld", "rdp"):
        raise ValueError(f"accountant must be 'pld' or 'rdp', got {accountant!r}")


def _check(sampling_rate, rounds, delta, accountant) -> tuple[float, int, float]:
    q = check_number("sampling_rate", sampling_rate, above=0)
    if q > 1:
        raise ValueError(f"sampling_rate is a probability in (0, 1], got {sampling_rate!r}")
    delta = check_delta(delta)
    _check_accountant(accountant)
    return q, check_integer("rounds", rounds, 1), delta


def _event(dp, noise_multiplier: float, q: float, rounds: int):
    """`rounds` Poisson-sampled Gaussian rounds (no sampling at q >= 1)."""
    gaussian = dp.GaussianDpEvent(noise_multiplier)
    one = gaussian if q >= 1 else dp.PoissonSampledDpEvent(q, gaussian)
    return dp.SelfComposedDpEvent(one, rounds)


def _relation(dp, name: str):
    return (dp.NeighboringRelation.REPLACE_ONE if name == "replace_one"
            else dp.NeighboringRelation.ADD_OR_REMOVE_ONE)


def _accountant(dp, kind: Accountant, relation=None):
    relation = relation or dp.NeighboringRelation.ADD_OR_REMOVE_ONE
    return (dp.pld.PLDAccountant(relation) if kind == "pld"
            else dp.rdp.RdpAccountant(neighboring_relation=relation))


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float, *,
            accountant: Accountant = "pld") -> float:
    """The (epsilon, `delta`) user-level guarantee of `rounds` rounds (inf without noise)."""
    z = check_number("noise_multiplier", noise_multiplier, at_least=0)
    q, rounds, delta = _check(sampling_rate, rounds, delta, accountant)
    if z == 0:
        return float("inf")
    return _epsilon_of(_event(_dp_accounting(), z, q, rounds), delta, accountant)


def noise_multiplier_for(target_epsilon: float, sampling_rate: float, rounds: int,
                         delta: float, *, accountant: Accountant = "pld") -> float:
    """The smallest noise multiplier whose `rounds` rounds stay within (`target_epsilon`,
    `delta`) (dp-accounting's calibration, to its default tolerance)."""
    target = check_number("target_epsilon", target_epsilon, above=0)
    q, rounds, delta = _check(sampling_rate, rounds, delta, accountant)
    dp = _dp_accounting()
    return float(dp.calibrate_dp_mechanism(lambda: _accountant(dp, accountant),
                                           lambda z: _event(dp, z, q, rounds), target, delta))


class RdpCurve(NamedTuple):
    """A mechanism's Renyi-DP curve, `rdp[i]` at order `orders[i]`, for a guarantee that
    dp-accounting has no event for (the Skellam mechanism's bound, `fs.secagg`): a `privacy`
    function returns one for all its rounds (composition adds RDP), and the `Ledger` turns
    it into epsilon by dp-accounting's `compute_epsilon` (RDP accountant only)."""

    orders: tuple[float, ...]
    rdp: tuple[float, ...]

    def epsilon(self, delta: float) -> float:
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
        return float(compute_epsilon(self.orders, self.rdp, delta)[0])


def gaussian_event(noise_multiplier: float, participation: Participation, rounds: int):
    """The dp-accounting event of `rounds` rounds of a Gaussian sum mechanism (each client's
    contribution of norm at most 1, noise `noise_multiplier`) under `participation`:
    Poisson-sampled (add or remove one client: sensitivity 1) or sampled without replacement
    (replace one: sensitivity 2) each round, or, cyclic, composed once per round the client
    can take part in (add or remove, no amplification). Without noise, a non-private event
    (epsilon inf)."""
    dp = _dp_accounting()
    if noise_multiplier == 0:
        return dp.NonPrivateDpEvent()
    n, size = participation.num_clients, participation.size
    if participation.kind == "poisson":
        return _event(dp, noise_multiplier, participation.rate, rounds)
    if participation.kind == "fixed":
        # Replace-one: a client swapped for another moves the sum by up to 2 clip norms, and
        # the RDP accountant (the one that covers this sampling) takes the multiplier over
        # that sensitivity as given.
        half = dp.GaussianDpEvent(noise_multiplier / 2)
        one = half if size >= n else dp.SampledWithoutReplacementDpEvent(n, int(size), half)
        return dp.SelfComposedDpEvent(one, rounds)
    if participation.kind == "cyclic":
        return dp.SelfComposedDpEvent(dp.GaussianDpEvent(noise_multiplier),
                                      participations(participation, rounds))
    raise ValueError(f"no accountant for participation {participation.kind!r}")


def participations(participation: Participation, rounds: int) -> int:
    """The most rounds of `rounds` one client of a cyclic sampler takes part in."""
    return math.ceil(rounds / max(1, participation.num_clients // int(participation.size)))


def relation(participation: Participation) -> str:
    """The neighbouring relation the guarantee is under: "replace_one" for a fixed-size
    cohort (a client swapped for another keeps the size), "add_or_remove_one" otherwise."""
    return "replace_one" if participation.kind == "fixed" else "add_or_remove_one"


def default_delta(num_clients: int) -> float:
    """`1 / N^1.1` for a population of N: below 1 / N, as a meaningful delta must be."""
    return float(num_clients) ** -1.1


class Ledger:
    """The privacy a run has spent: epsilon at `delta` after r rounds, by the accountant.

    Args:
      event: the chain's `privacy`, `(participation, rounds) -> DpEvent`.
      participation: the sampler's.
      delta: default `default_delta(N)`; a delta of 1 / N or more is warned about.
      accountant: "rdp" (default: about 0.07 s a query for a Poisson-sampled round) or
        "pld" (tighter, about 1 s a query; it does not cover a fixed-size cohort).
      target_epsilon: the budget a run stops within (`over`).
    """

    def __init__(self, event: EventFn, participation: Participation | None, *,
                 delta: float | None = None, accountant: Accountant | None = None,
                 target_epsilon: float | None = None, sampler_name: str = "this sampler"):
        if participation is None:
            raise ValueError(f"no privacy accountant covers {sampler_name}'s sampling: use "
                             "fs.sampling.poisson (DP-FedAvg's), uniform (fixed size) or "
                             "cyclic (DP-FTRL's)")
        n = participation.num_clients
        if delta is None:
            delta = default_delta(n)
        delta = check_delta(delta)
        if delta >= 1 / n:
            warnings.warn(f"delta {delta:g} is not below 1 / N = {1 / n:g} for a population "
                          f"of {n}: a mechanism that publishes one client's data outright "
                          f"meets it; take delta < 1 / N, e.g. {default_delta(n):.3g}",
                          stacklevel=3)
        if accountant is None:
            accountant = "rdp"
        elif accountant not in ("pld", "rdp"):
            raise ValueError(f"accountant must be 'pld' or 'rdp', got {accountant!r}")
        elif accountant == "pld" and participation.kind == "fixed":
            raise ValueError("the PLD accountant does not cover a fixed-size cohort (sampling "
                             "without replacement): use accountant='rdp', or "
                             "fs.sampling.poisson")
        if target_epsilon is not None:
            target_epsilon = check_number("target_epsilon", target_epsilon, above=0)
        self.event, self.participation, self.delta = event, participation, delta
        self.accountant, self.target_epsilon = accountant, target_epsilon
        self.relation = relation(participation)
        self._cache: dict[int, float] = {0: 0.0}
        one = event(participation, 1)  # a participation the stage cannot account for fails now
        if accountant == "pld" and not _pld_covers(one, self.relation):
            raise ValueError(f"the PLD accountant does not cover {type(one).__name__}: use "
                             "accountant='rdp'")
        if target_epsilon is not None and self.epsilon(1) > target_epsilon:
            raise ValueError(f"target_epsilon {target_epsilon:g} cannot be reached: one "
                             f"round already spends epsilon {self.epsilon(1):.4g} at delta "
                             f"{delta:.3g}; raise the noise multiplier or lower the sampling "
                             "rate (fs.privacy.noise_multiplier_for)")

    def epsilon(self, rounds: int) -> float:
        """Epsilon at `delta` after `rounds` rounds (inf for a non-private event)."""
        if rounds not in self._cache:
            event = self.event(self.participation, rounds)
            if isinstance(event, RdpCurve):
                self._cache[rounds] = event.epsilon(self.delta)
                return self._cache[rounds]
            dp = _dp_accounting()
            acc = _accountant(dp, self.accountant, _relation(dp, self.relation))
            acc.compose(event)
            self._cache[rounds] = float(acc.get_epsilon(self.delta))
        return self._cache[rounds]

    def over(self, rounds: int) -> bool:
        """Whether `rounds` rounds would spend more than the target epsilon."""
        return self.target_epsilon is not None and self.epsilon(rounds) > self.target_epsilon

    def summary(self, rounds: int) -> dict:
        return {"epsilon": self.epsilon(rounds), "delta": self.delta,
                "accountant": self.accountant, "relation": self.relation,
                "target_epsilon": self.target_epsilon, "rounds": rounds}


def _replacement_gaussian(dp, noise_multiplier: float, terms: int = 1):
    """The Gaussian mechanism on a sum of terms clipped to C with noise z C, one record
    replaced by any other where it is `terms` of the terms: sensitivity 2 `terms` C, so
    dp-accounting's noise multiplier (noise over sensitivity) is z / (2 `terms`)."""
    return dp.GaussianDpEvent(noise_multiplier / (2 * terms))


def _epsilon_of(event, delta: float, accountant: Accountant) -> float:
    """Epsilon at `delta`; the events carry their sensitivity, so an unsampled Gaussian needs
    no relation beyond the accountant's default."""
    dp = _dp_accounting()
    acc = _accountant(dp, accountant)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def local_event(noise_multiplier: float, participations: int):
    """The dp-accounting event of one client's messages under `aggregators.local_dp(
    noise_multiplier, C)` over `participations` rounds: a Gaussian mechanism of sensitivity
    2C (its clipped update replaced by any other) and noise z C per round, composed."""
    z = check_number("noise_multiplier", noise_multiplier, at_least=0)
    participations = check_integer("participations", participations, 0)
    dp = _dp_accounting()
    return dp.SelfComposedDpEvent(_replacement_gaussian(dp, z), participations)


def local_epsilon(noise_multiplier: float, participations: int, delta: float, *,
                  accountant: Accountant = "pld") -> float:
    """The local (epsilon, `delta`) of one client that sent `participations` updates through
    `aggregators.local_dp(noise_multiplier, C)`: for any two data sets of that client, the
    distributions of everything it sent differ by at most that much, whatever the server
    does with them (inf without noise, 0 before it takes part).

    For a worst case over a run of `rounds`: `rounds` under Poisson or uniform sampling (a
    client may be drawn every round), `participations(participation, rounds)` for cyclic.

    Example:
      >>> round(local_epsilon(2.0, 10, 1e-5), 1)
      17.9
    """
    z = check_number("noise_multiplier", noise_multiplier, at_least=0)
    participations = check_integer("participations", participations, 0)
    delta = check_delta(delta)
    _check_accountant(accountant)
    if participations == 0:
        return 0.0
    if z == 0:
        return float("inf")
    return _epsilon_of(local_event(z, participations), delta, accountant)


def worst_case_batches(num_examples: int, batching: Batching,
                       batch_size: int | None = None) -> list[int]:
    """How often one example can appear in each local batch of one round, at worst: the
    counts `k` of the batches it appears in, for the arrangement of its client's shuffles that
    maximizes sum k^2 (the composed Gaussian's exponent: a batch where it appears k times
    moves by 2kC when it is replaced).

    Each epoch holds the example once; epochs run back to back (`Batching`), so a batch that
    spans the end of one epoch and the start of the next (the client's size not a multiple of
    B) may hold it twice, and a batch longer than the client more often. A run of epochs can
    share a batch when one batch meets all of them; a dynamic program over the epochs picks
    the best split into such runs. One epoch, or batches aligned to epochs: `[1] * epochs`.

    Args:
      num_examples: the client's examples (before `batching`'s cap).
      batching: the client's `Batching` (`algorithm.batching`).
      batch_size: B when `batching.batch_size` is None (one full batch: the population's
        largest client, `batching.resolve_batch_size(data)`).
    """
    b = batching.batch_size if batching.batch_size is not None else batch_size
    if b is None:
        raise ValueError("batching.batch_size is None (one full batch per step): pass "
                         "batch_size=, the population's largest client "
                         "(batching.resolve_batch_size(data))")
    b = check_integer("batch_size", b, 1)
    n = int(batching.examples_used(np.array([check_integer("num_examples", num_examples, 0)]))[0])
    if n == 0:
        return []
    length = int(batching.steps_and_length(np.array([n]), b)[1][0])
    epochs = -(-length // n)
    first = [e * n // b for e in range(epochs)]  # the batches epoch e meets: first..last
    last = [(min((e + 1) * n, length) - 1) // b for e in range(epochs)]
    best, cut = [0] + [-1] * epochs, [0] * (epochs + 1)
    for end in range(1, epochs + 1):
        for start in range(end):  # epochs start..end-1 in one batch: one batch meets them all
            value = best[start] + (end - start) ** 2
            if first[end - 1] <= last[start] and value > best[end]:
                best[end], cut[end] = value, start
    counts, end = [], epochs
    while end:
        counts.append(end - cut[end])
        end = cut[end]
    return counts[::-1]


def example_event(noise_multiplier: float, num_examples: int, participations: int, batching,
                  batch_size: int | None = None):
    """The dp-accounting event of one example of a client with `num_examples` examples under
    `ExampleDP(C, noise_multiplier)` over `participations` rounds: per round, one Gaussian
    mechanism of sensitivity 2kC and noise zC for each batch the example appears in k times
    (`worst_case_batches`), composed."""
    z = check_number("noise_multiplier", noise_multiplier, at_least=0)
    participations = check_integer("participations", participations, 0)
    dp = _dp_accounting()
    counts = collections.Counter(worst_case_batches(num_examples, batching, batch_size))
    one_round = dp.ComposedDpEvent([dp.SelfComposedDpEvent(_replacement_gaussian(dp, z, k), m)
                                    for k, m in sorted(counts.items())])
    return dp.SelfComposedDpEvent(one_round, participations)


def example_epsilon(noise_multiplier: float, batching: Batching,
                    num_examples: int | np.ndarray, participations: int | np.ndarray,
                    delta: float, *, batch_size: int | None = None,
                    accountant: Accountant = "pld") -> np.ndarray:
    """Each client's example-level (epsilon, `delta`) under DP-SGD in its local steps
    (`fs.algorithms.ExampleDP(C, noise_multiplier)`): any one example of the client replaced
    by any other changes the distribution of everything the client sent by at most that much.

    What is accounted: the client's noised batch gradients, each a Gaussian mechanism of
    noise zC on a sum of per-example gradients clipped to C (the batch size as a fixed
    denominator), composed over the local steps of every round it took part in. No
    amplification by subsampling: the batches are shuffled epochs, not Poisson samples. The
    shuffles and step counts depend only on the seed, the round, the client's id and size,
    so under replacement they are the same on both data sets; an example appears once per
    epoch, and where a batch spans two epochs it may appear twice in it
    (`worst_case_batches`). A client's training metrics are outside the guarantee.

    Args:
      noise_multiplier: z, `ExampleDP.noise_multiplier`.
      batching: the training's `Batching` (`algorithm.batching`).
      num_examples: int or array, each client's examples (`data.num_examples`).
      participations: int or array (broadcast with `num_examples`), the rounds each client
        took part in.
      delta: the delta per example.
      batch_size: B, only when `batching.batch_size` is None.
      accountant: "pld" (tight) or "rdp".

    Returns:
      float64 array of the broadcast shape (inf without noise, 0 for a client with no step).
    """
    z = check_number("noise_multiplier", noise_multiplier, at_least=0)
    delta = check_delta(delta)
    _check_accountant(accountant)
    n, p = np.broadcast_arrays(np.asarray(num_examples), np.asarray(participations))
    out = np.empty(n.shape, np.float64)
    cache: dict[tuple, float] = {}
    for i in np.ndindex(n.shape):
        counts = tuple(worst_case_batches(n[i].item(), batching, batch_size))
        rounds = check_integer("participations", p[i].item(), 0)
        if (counts, rounds) not in cache:
            cache[counts, rounds] = (0.0 if not counts or rounds == 0 else
                                     float("inf") if z == 0 else
                                     _epsilon_of(example_event(z, n[i].item(), rounds, batching,
                                                               batch_size), delta, accountant))
        out[i] = cache[counts, rounds]
    return out


def _pld_covers(event, relation_name: str) -> bool:
    """Whether dp-accounting's PLD accountant composes `event` (not an `RdpCurve`, nor a
    zCDP event such as the distributed discrete Gaussian's)."""
    if isinstance(event, RdpCurve):
        return False
    dp = _dp_accounting()
    return dp.pld.PLDAccountant(_relation(dp, relation_name)).supports(event)
