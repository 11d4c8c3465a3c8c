"""Privacy accounting against its math: the Gaussian mechanism's exact curve, and the
accountants of dp-accounting called directly."""

import math

import dp_accounting
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import aggregators as agg
from fedjax_sim import privacy, sampling
from fedjax_sim.testing import assert_trees_close


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


def _direct(event, delta, kind="rdp", relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
    acc = (dp_accounting.pld.PLDAccountant(relation) if kind == "pld"
           else dp_accounting.rdp.RdpAccountant(neighboring_relation=relation))
    acc.compose(event)
    return acc.get_epsilon(delta)


def test_the_ledger_accounts_for_the_sampler_actually_used():
    z, n, m, delta = 1.0, 1000, 20, 1e-4
    g = dp_accounting.GaussianDpEvent(z)
    stage = agg.dp_mean(z, 1.0, m)
    poisson = privacy.Ledger(stage.privacy, sampling.poisson(n, m).participation, delta=delta)
    assert poisson.epsilon(50) == _direct(
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(m / n, g), 50),
        delta)
    tight = privacy.Ledger(stage.privacy, sampling.poisson(n, m).participation, delta=delta,
                           accountant="pld")
    assert tight.epsilon(50) == _direct(
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(m / n, g), 50),
        delta, "pld")
    assert tight.epsilon(50) < poisson.epsilon(50)
    fixed = privacy.Ledger(stage.privacy, sampling.uniform(n, m).participation, delta=delta)
    assert fixed.relation == "replace_one"
    # Replace-one: a swapped client moves the sum by two clip norms, so the noise is z / 2
    # of that sensitivity (the RDP accountant takes a Gaussian's multiplier as given).
    assert fixed.epsilon(50) == _direct(
        dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
            n, m, dp_accounting.GaussianDpEvent(z / 2)), 50),
        delta, relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    assert fixed.epsilon(50) > poisson.epsilon(50)
    cyclic = privacy.Ledger(stage.privacy, sampling.cyclic(n, m).participation, delta=delta)
    # n / m = 50 rounds a cycle: one participation in 50 rounds, two in 51.
    assert cyclic.epsilon(50) == _direct(g, delta)
    assert cyclic.epsilon(51) == _direct(dp_accounting.SelfComposedDpEvent(g, 2), delta)
    with pytest.raises(ValueError, match="PLD accountant does not cover a fixed-size"):
        privacy.Ledger(stage.privacy, sampling.uniform(n, m).participation, accountant="pld")
    with pytest.raises(ValueError, match="no privacy accountant covers with_replacement"):
        privacy.Ledger(stage.privacy, None, sampler_name="with_replacement(20)")


def test_the_default_delta_is_below_one_over_the_population_and_a_larger_one_is_warned():
    participation = sampling.poisson(1000, 10).participation
    ledger = privacy.Ledger(agg.dp_mean(1.0, 1.0, 10).privacy, participation)
    assert ledger.delta == 1000 ** -1.1 < 1 / 1000
    with pytest.warns(UserWarning, match="not below 1 / N = 0.001"):
        privacy.Ledger(agg.dp_mean(1.0, 1.0, 10).privacy, participation, delta=1e-3)
    with pytest.raises(ValueError, match="delta must be < 1"):
        privacy.Ledger(agg.dp_mean(1.0, 1.0, 10).privacy, participation, delta=1.5)
    with pytest.raises(ValueError, match="target_epsilon 0.01 cannot be reached: one round"):
        privacy.Ledger(agg.dp_mean(0.5, 1.0, 10).privacy, participation, target_epsilon=0.01)


@pytest.fixture(scope="module")
def population():
    return fs.data.synthetic(1.0, 1.0, num_clients=40, max_examples_per_client=40, seed=2)


def _dp_fedavg(z, clip, expected):
    chain = agg.chain(agg.clip(clip), agg.weight_by("uniform"), agg.dp_mean(z, clip, expected))
    return fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.05),
                                batch_size=10, aggregator=chain)


def test_every_round_records_its_epsilon_and_a_run_stops_within_its_target(population):
    train, _ = population
    sampler = fs.sampling.poisson(train.num_clients, 8)
    ledger = privacy.Ledger(agg.dp_mean(1.0, 1.0, 8).privacy, sampler.participation)
    target = (ledger.epsilon(3) + ledger.epsilon(4)) / 2  # room for 3 rounds, not 4
    result = fs.simulate(_dp_fedavg(1.0, 1.0, 8), train, rounds=10, sampler=sampler,
                         chunk_size=4, progress=False, target_epsilon=target)
    assert [r["epsilon"] for r in result.history] == [ledger.epsilon(r) for r in (1, 2, 3)]
    assert result.privacy == {"epsilon": ledger.epsilon(3), "delta": 40 ** -1.1,
                              "accountant": "rdp", "relation": "add_or_remove_one",
                              "target_epsilon": target, "rounds": 3}


def test_without_noise_or_clipping_dp_fedavg_is_uniformly_weighted_fedavg(population):
    train, _ = population
    kwargs = dict(rounds=2, cohort_size=8, chunk_size=4, progress=False, seed=3)
    dp = fs.simulate(_dp_fedavg(0.0, 1e9, 8), train, **kwargs)
    plain = fs.simulate(fs.algorithms.fedavg(fs.models.logistic_regression(60, 10),
                                             optax.sgd(0.05), batch_size=10,
                                             client_weighting="uniform"), train, **kwargs)
    assert dp.privacy["epsilon"] == math.inf
    assert_trees_close(dp.params, plain.params, rtol=1e-5, atol=1e-7)


def test_settings_no_accountant_covers_are_refused_before_anything_compiles(population):
    train, _ = population
    with pytest.raises(ValueError, match="no privacy accountant covers with_replacement"):
        fs.Simulation(_dp_fedavg(1.0, 1.0, 8), train, progress=False,
                      sampler=fs.sampling.with_replacement(train.num_clients, 8))
    plain = fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.05))
    with pytest.raises(ValueError, match="target_epsilon given, but the aggregation chain has"):
        fs.Simulation(plain, train, cohort_size=8, target_epsilon=2.0, progress=False)


@pytest.mark.slow  # a whole run: CI runs it with the slow tests
def test_adaptive_clipping_runs_in_a_simulation_at_dp_fedavgs_price(population):
    train, _ = population
    sampler = fs.sampling.poisson(train.num_clients, 8)
    chain = agg.chain(agg.weight_by("uniform"), agg.adaptive_dp_mean(1.0, 8, initial_clip=0.01,
                                                             count_stddev=2.0))
    algo = fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.05),
                                batch_size=10, aggregator=chain)
    result = fs.simulate(algo, train, rounds=3, sampler=sampler, chunk_size=4, progress=False)
    clips = [r["server"]["clip_norm"] for r in result.history]
    assert clips[0] == pytest.approx(0.01) and clips[2] > clips[1] > clips[0]  # all clipped
    ledger = privacy.Ledger(agg.dp_mean(1.0, 1.0, 8).privacy, sampler.participation)
    assert result.privacy["epsilon"] == ledger.epsilon(3)
