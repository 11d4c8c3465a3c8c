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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from fedjax_sim.checks import check_integer, check_number
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


def _check(sampling_rate, rounds, delta, accountant) -> tuple[float, int, float]:
    q = check_number("sampling_rate", sampling_rate, above=0)
    if q > 1:
        raise ValueError(f"sampling_rate is a probability in (0, 1], got {sampling_rate!r}")
    delta = check_number("delta", delta, above=0)
    if delta >= 1:
        raise ValueError(f"delta must be < 1 (typically below 1 / population), got {delta!r}")
    if accountant not in ("pld", "rdp"):
        raise ValueError(f"accountant must be 'pld' or 'rdp', got {accountant!r}")
    return q, check_integer("rounds", rounds, 1), delta


def _event(dp, noise_multiplier: float, q: float, rounds: int):
    gaussian = dp.GaussianDpEvent(noise_multiplier)
    one = gaussian if q == 1 else dp.PoissonSampledDpEvent(q, gaussian)
    return dp.SelfComposedDpEvent(one, rounds)


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
    dp = _dp_accounting()
    acc = _accountant(dp, accountant)
    acc.compose(_event(dp, z, q, rounds))
    return float(acc.get_epsilon(delta))


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
    """The dp-accounting event of `rounds` rounds of a Gaussian sum mechanism (sensitivity 1,
    noise `noise_multiplier`) under `participation`: Poisson-sampled or sampled without
    replacement each round, or, cyclic, composed once per round the client can take part in
    (no amplification)."""
    dp = _dp_accounting()
    gaussian = dp.GaussianDpEvent(noise_multiplier)
    n, size = participation.num_clients, participation.size
    if participation.kind == "poisson":
        one = gaussian if participation.rate >= 1 else dp.PoissonSampledDpEvent(
            participation.rate, gaussian)
        return dp.SelfComposedDpEvent(one, rounds)
    if participation.kind == "fixed":
        one = gaussian if size >= n else dp.SampledWithoutReplacementDpEvent(n, int(size),
                                                                             gaussian)
        return dp.SelfComposedDpEvent(one, rounds)
    if participation.kind == "cyclic":
        return dp.SelfComposedDpEvent(gaussian, participations(participation, rounds))
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
      accountant: "pld" (tight) or "rdp"; default PLD where it covers the event (Poisson and
        cyclic), else RDP (a fixed-size cohort, which PLD does not cover).
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
        delta = _check(1.0, 1, delta, "rdp")[2]
        if delta >= 1 / n:
            warnings.warn(f"delta {delta:g} is not below 1 / N = {1 / n:g} for a population "
                          f"of {n}: a mechanism that publishes one client's data outright "
                          f"meets it; take delta < 1 / N, e.g. {default_delta(n):.3g}",
                          stacklevel=3)
        explicit = accountant
        if accountant is None:
            accountant = "rdp" if participation.kind == "fixed" else "pld"
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
        if explicit == "pld" and not _pld_covers(one, self.relation):
            raise ValueError(f"the PLD accountant does not cover {type(one).__name__}: use "
                             "accountant='rdp'")
        if explicit is None and not _pld_covers(one, self.relation):
            self.accountant = "rdp"
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
            relation = (dp.NeighboringRelation.REPLACE_ONE if self.relation == "replace_one"
                        else dp.NeighboringRelation.ADD_OR_REMOVE_ONE)
            acc = _accountant(dp, self.accountant, relation)
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


def _pld_covers(event, relation_name: str) -> bool:
    """Whether dp-accounting's PLD accountant composes `event` (not an `RdpCurve`, nor a
    zCDP event such as the distributed discrete Gaussian's)."""
    if isinstance(event, RdpCurve):
        return False
    dp = _dp_accounting()
    rel = (dp.NeighboringRelation.REPLACE_ONE if relation_name == "replace_one"
           else dp.NeighboringRelation.ADD_OR_REMOVE_ONE)
    return dp.pld.PLDAccountant(rel).supports(event)
