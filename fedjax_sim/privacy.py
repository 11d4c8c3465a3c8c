"""Privacy accounting for DP-FedAvg (`aggregators.clip` + `aggregators.dp_mean`): the epsilon
of a number of rounds of the Poisson-sampled Gaussian mechanism, and the noise multiplier for
a target epsilon, computed by Google's dp-accounting (RDP or PLD accountant), never by hand.

Each round is one Poisson-sampled Gaussian mechanism at the user level: each client takes
part with probability `sampling_rate` (`fs.sampling.poisson`), its clipped update has
sensitivity `clip_norm`, and the sum gets noise of standard deviation `noise_multiplier *
clip_norm`. Install with `pip install "fedjax_sim[privacy]"`.
"""

from __future__ import annotations

from typing import Literal

from fedjax_sim.checks import check_integer, check_number

Accountant = Literal["pld", "rdp"]


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


def _accountant(dp, kind: Accountant):
    return dp.pld.PLDAccountant() if kind == "pld" else dp.rdp.RdpAccountant()


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
