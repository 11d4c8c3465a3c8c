"""Privacy accounting against its math: the Gaussian mechanism's exact curve, and the
accountants of dp-accounting called directly."""

import math

import dp_accounting
import pytest

from fedjax_sim import privacy


def _phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _gaussian_delta(eps, z):
    """The exact delta(eps) of one Gaussian mechanism of sensitivity 1 and noise z (Balle and
    Wang 2018, Theorem 8)."""
    return _phi(1 / (2 * z) - eps * z) - math.exp(eps) * _phi(-1 / (2 * z) - eps * z)


@pytest.mark.parametrize("z", [0.8, 2.0])
def test_one_full_round_is_the_gaussian_mechanism(z):
    delta = 1e-5
    lo, hi = 0.0, 50.0  # the exact epsilon, by bisection on the decreasing delta(eps)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _gaussian_delta(mid, z) > delta else (lo, mid)
    pld = privacy.epsilon(z, 1.0, 1, delta)
    assert hi <= pld <= hi * 1.01  # PLD's discretization errs on the safe side, slightly
    assert privacy.epsilon(z, 1.0, 1, delta, accountant="rdp") >= pld  # RDP is looser


def test_sampled_rounds_match_dp_accounting_called_directly():
    z, q, rounds, delta = 1.1, 0.01, 1000, 1e-6
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    for kind, acc in (("pld", dp_accounting.pld.PLDAccountant()),
                      ("rdp", dp_accounting.rdp.RdpAccountant())):
        acc.compose(event)
        assert privacy.epsilon(z, q, rounds, delta, accountant=kind) == acc.get_epsilon(delta)
    # More rounds or a larger sample cost more; more noise costs less.
    base = privacy.epsilon(z, q, rounds, delta)
    assert privacy.epsilon(z, q, 2 * rounds, delta) > base
    assert privacy.epsilon(z, 2 * q, rounds, delta) > base
    assert privacy.epsilon(2 * z, q, rounds, delta) < base
    assert privacy.epsilon(0.0, q, rounds, delta) == math.inf


def test_the_calibrated_noise_meets_the_target_epsilon():
    z = privacy.noise_multiplier_for(2.0, 0.02, 500, 1e-5)
    assert privacy.epsilon(z, 0.02, 500, 1e-5) <= 2.0 + 1e-6
    assert privacy.epsilon(0.95 * z, 0.02, 500, 1e-5) > 2.0  # and is not much more than needed


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampling_rate=1.5), "sampling_rate is a probability in"),
    (dict(sampling_rate=0.0), "sampling_rate must be a finite number > 0"),
    (dict(delta=1.0), "delta must be < 1"),
    (dict(rounds=0), "rounds"),
    (dict(accountant="moments"), "accountant must be 'pld' or 'rdp'"),
])
def test_impossible_settings_are_named(kwargs, message):
    args = dict(noise_multiplier=1.0, sampling_rate=0.1, rounds=10, delta=1e-5) | kwargs
    with pytest.raises(ValueError, match=message):
        privacy.epsilon(**args)
