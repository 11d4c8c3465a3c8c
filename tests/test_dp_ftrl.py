"""DP-FTRL against its math: the noise on increments against dense matrices in numpy (the
tree built from Kairouz et al. 2021's definition, the Toeplitz strategies from jax-privacy's
own materialization), its scale, its accounting against dp-accounting and jax-privacy called
directly, its error against independent noise at the same epsilon, and the stage under the
engine and through a Simulation that checkpoints and resumes."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_privacy import accounting as jp_accounting
from jax_privacy.matrix_factorization import buffered_toeplitz as bt
from jax_privacy.matrix_factorization import sensitivity as jp_sensitivity
from scipy import stats
from test_aggregators import _dp_round, _engine_round, outputs_and_weights, run_chain

import fedjax_sim as fs
from fedjax_sim import aggregators as agg
from fedjax_sim import dp_ftrl
from fedjax_sim.aggregators import Reduced
from fedjax_sim.sampling import Participation
from fedjax_sim.testing import assert_trees_equal

ROUNDS, SEP = 24, 8  # a cyclic sampler of 40 clients in cohorts of 5: 3 participations
CYCLIC = Participation("cyclic", 40, 5)
BANDED = np.array([0.7, 0.45, 0.35, 0.3], np.float32)  # non-increasing Toeplitz coefficients


@pytest.fixture(scope="module")
def blt_strategy():
    with jax.enable_x64():
        return bt.BufferedToeplitz.from_rational_approx_to_sqrt_x(
            3, max_buf_decay=0.99, max_pillutla_score=0.99)


@pytest.fixture(scope="module")
def mechanisms(blt_strategy):
    return {"tree": dp_ftrl.mechanism("tree", ROUNDS, SEP),
            "banded": dp_ftrl.mechanism("banded", ROUNDS, SEP, strategy=BANDED),
            "blt": dp_ftrl.mechanism("blt", ROUNDS, SEP, strategy=blt_strategy)}


def tree_strategy(rounds, period):
    """C of tree aggregation restarted every `period` rounds, from the paper: row t is the
    node ending at t, covering the 2^ctz(p) positions up to t's position p (1-based) in its
    tree."""
    c = np.zeros((rounds, rounds))
    for t in range(rounds):
        p = t % period + 1
        width = p & -p
        c[t, t - width + 1:t + 1] = 1
    return c


def dense_strategy(name, rounds, blt_strategy):
    if name == "tree":
        return tree_strategy(rounds, SEP)
    if name == "banded":
        c = np.zeros((rounds, rounds))
        for d, v in enumerate(BANDED):
            c += np.diag(np.full(rounds - d, float(v)), -d)
        return c
    with jax.enable_x64():
        return np.asarray(blt_strategy.materialize(rounds), np.float64)


def stream(mech, z, c, w, width, rounds):
    """The stage's server part `rounds` times on zero sums: (noise added to the sum per
    round [rounds, width], the i.i.d. draws it made, noise_stddev per round, final state)."""
    stage = dp_ftrl.dp_ftrl_mean(z, c, w, mech)
    state = stage.init({"a": jnp.zeros(width)})
    server = jax.jit(stage.server)
    zero = Reduced({"a": jnp.zeros(width)}, jnp.float32(0))
    noise, draws, stddev = [], [], []
    for t in range(rounds):
        key = jax.random.key(100 + t)
        value, state, metrics = server(zero, state, key)
        noise.append(np.asarray(value["a"], np.float64) * w)
        draws.append(z * c * np.asarray(jax.random.normal(jax.random.split(key, 1)[0],
                                                          (width,)), np.float64))
        stddev.append(float(metrics["noise_stddev"]))
    return np.stack(noise), np.stack(draws), np.array(stddev), state


@pytest.mark.parametrize("name", ["tree", "banded", "blt"])
def test_noise_on_increments_adds_up_to_the_prefix_sum_noise_b_z(name, mechanisms, blt_strategy):
    """Round t adds (C^{-1} z)_t, so the running sum is (B z)_t with B = A C^{-1}."""
    noise, draws, _, _ = stream(mechanisms[name], 1.5, 0.5, 4.0, 16, ROUNDS)
    c = dense_strategy(name, ROUNDS, blt_strategy)
    b = np.tril(np.ones((ROUNDS, ROUNDS))) @ np.linalg.inv(c)
    np.testing.assert_allclose(noise, np.linalg.solve(c, draws), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.cumsum(noise, 0), b @ draws, rtol=1e-4, atol=1e-4)
    if name == "tree":  # a prefix sum is its binary decomposition's nodes (all earlier trees')
        assert set(np.round(b, 6).ravel()) == {0.0, 1.0}
        nodes = [bin(SEP).count("1") * (t // SEP) + bin(t % SEP + 1).count("1")
                 for t in range(ROUNDS)]
        np.testing.assert_allclose(b.sum(1), nodes, atol=1e-6)


@pytest.mark.parametrize("name", ["tree", "blt"])
def test_the_noise_has_the_stated_marginal_stddev(name, mechanisms, blt_strategy):
    z, c, w, width = 1.3, 0.5, 4.0, 20000
    noise, _, stddev, _ = stream(mechanisms[name], z, c, w, width, 10)
    inverse = np.linalg.inv(dense_strategy(name, 10, blt_strategy))
    np.testing.assert_allclose(stddev, z * c * np.linalg.norm(inverse, axis=1) / w, rtol=1e-4)
    for t in range(10):  # the noise over W, per coordinate
        x = noise[t] / w
        assert abs(x.std() / stddev[t] - 1) < 0.03 and abs(x.mean()) < 0.03 * stddev[t]
    assert stats.kstest(noise[3] / w / stddev[3], "norm").pvalue > 1e-3
    assert len(set(np.round(stddev, 6))) > 1  # the rounds differ: the test can tell them


def test_without_noise_it_is_dp_fedavgs_mean_round_after_round(mechanisms):
    outputs, valid, n = outputs_and_weights()
    plain = agg.chain(agg.weight_by("uniform"), agg.dp_mean(0.0, 1.0, 10.0))
    expected, _, _, server = run_chain(plain, outputs, valid, n)
    chain = agg.chain(agg.weight_by("uniform"),
                      dp_ftrl.dp_ftrl_mean(0.0, 1.0, 10.0, mechanisms["blt"]))
    value, state, _, metrics = run_chain(chain, outputs, valid, n)
    assert_trees_equal(value, expected)
    assert int(state[-1].round) == 1 and float(metrics["noise_stddev"]) == 0.0
    np.testing.assert_allclose(metrics["weight_sum"], server["weight_sum"])
    sums = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    for mech in mechanisms.values():  # the sum over W, round after round, buffers and all
        stage = dp_ftrl.dp_ftrl_mean(0.0, 1.0, 10.0, mech)
        step, state = jax.jit(stage.server), stage.init({"a": jnp.zeros(7)})
        for t, total in enumerate(sums):
            value, state, _ = step(Reduced({"a": jnp.asarray(total)}, jnp.float32(6)), state,
                                   jax.random.key(t))
            np.testing.assert_allclose(value["a"], total / 10.0, rtol=1e-6, atol=1e-9)


def _cyclic_patterns(c, b):
    """||C u|| for each cyclic pattern u (every b rounds from each offset): numpy."""
    n = c.shape[0]
    return [np.linalg.norm(c[:, offset::b].sum(1)) for offset in range(min(b, n))]


@pytest.mark.parametrize("name", ["banded", "blt"])
def test_toeplitz_accounting_is_jax_privacys_single_release_gaussian(name, mechanisms,
                                                                     blt_strategy):
    """The sensitivity is the worst cyclic pattern's ||C u|| (by numpy over every offset;
    jax-privacy's generic upper bound is not below it), and the event is one Gaussian of
    noise / sensitivity, as jax-privacy's SingleReleaseTrainingAccountant takes it."""
    mech, z, delta = mechanisms[name], 3.0, 1e-5
    c = dense_strategy(name, ROUNDS, blt_strategy)
    sens = dp_ftrl.separation(CYCLIC), mech.sensitivity(SEP, ROUNDS)
    assert sens[0] == SEP
    np.testing.assert_allclose(sens[1], max(_cyclic_patterns(c, SEP)), rtol=1e-5)
    assert jp_sensitivity.get_min_sep_sensitivity_upper_bound(jnp.asarray(c), SEP) >= \
        sens[1] * (1 - 1e-5)
    ours = dp_accounting.pld.PLDAccountant()
    ours.compose(mech.event(z, CYCLIC, ROUNDS))
    params = jp_accounting.DpParams(noise_multipliers=z / sens[1], num_samples=40,
                                    delta=delta, batch_size=5)
    theirs = jp_accounting.SingleReleaseTrainingAccountant(jp_accounting.PldAccountantConfig())
    np.testing.assert_allclose(ours.get_epsilon(delta), theirs.compute_epsilon(ROUNDS, params),
                               rtol=1e-3)
    chain = agg.chain(agg.clip(1.0), agg.weight_by("uniform"),
                      dp_ftrl.dp_ftrl_mean(z, 1.0, 5.0, mech))
    ledger = fs.privacy.Ledger(chain.privacy, CYCLIC, delta=delta, accountant="pld")
    assert ledger.epsilon(ROUNDS) == ours.get_epsilon(delta)
    assert ledger.epsilon(ROUNDS // 2) < ledger.epsilon(ROUNDS)


@pytest.mark.parametrize("name", ["banded", "blt"])
def test_every_rounds_toeplitz_sensitivity_is_jax_privacys(name, mechanisms, blt_strategy):
    """The tabulated prefix sensitivities equal jax-privacy's minsep_sensitivity_squared
    called on the first r rounds' coefficients, for every r and several separations."""
    from jax_privacy.matrix_factorization import toeplitz

    mech = mechanisms[name]
    coefs = (toeplitz.pad_coefs_to_n(jnp.asarray(BANDED), ROUNDS) if name == "banded"
             else jnp.asarray(blt_strategy.toeplitz_coefs(ROUNDS), jnp.float32))
    for b in (1, 3, SEP, SEP + 5):
        for r in range(1, ROUNDS + 1):
            theirs = float(toeplitz.minsep_sensitivity_squared(coefs[:r], min_sep=b, n=r))
            assert mech.sensitivity(b, r) ** 2 == pytest.approx(theirs, rel=1e-5), (b, r)


def test_every_rounds_tree_sensitivity_is_jax_privacys_single_participation_bound(mechanisms):
    """sqrt(k) times one tree's sensitivity, by jax-privacy for each width a run reaches."""
    tree = mechanisms["tree"]
    for r in range(1, ROUNDS + 1):
        width = min(SEP, r)
        one = jp_sensitivity.single_participation_sensitivity(
            jnp.asarray(tree_strategy(width, SEP)))
        k = -(-r // SEP)
        assert tree.sensitivity(SEP, r) == pytest.approx(np.sqrt(k) * float(one), rel=1e-6)


def test_banded_accounting_is_jax_privacys_amplified_banded_mf_without_sampling(mechanisms):
    """Bands <= separation: jax-privacy's cyclic-Poisson analysis of banded MF (Choquette-Choo
    et al. 2023) with every client of a group sampled (q = 1) gives the same epsilon."""
    z, delta, config = 3.0, 1e-5, jp_accounting.RdpAccountantConfig()
    ours = config.create_accountant()
    ours.compose(mechanisms["banded"].event(z, CYCLIC, ROUNDS))
    # jax-privacy takes C column-normalized: the noise per unit column norm.
    params = jp_accounting.DpParams(noise_multipliers=z / float(np.linalg.norm(BANDED)),
                                    num_samples=40, delta=delta, batch_size=5, cycle_length=SEP)
    theirs = jp_accounting.DpsgdTrainingAccountant(config).compute_epsilon(ROUNDS, params)
    np.testing.assert_allclose(ours.get_epsilon(delta), theirs, rtol=1e-6)  # float32 C


def test_tree_accounting_is_dp_accountings_tree_aggregation_event(mechanisms):
    """Each client once per tree, k trees: dp-accounting's SingleEpochTreeAggregationDpEvent
    (RDP, replace-special) composed k times gives the same RDP epsilon; the sensitivity is
    sqrt(k) times a tree's depth's root, and the numpy cyclic patterns do not exceed it."""
    z, delta = 2.0, 1e-5
    tree = mechanisms["tree"]
    k = -(-ROUNDS // SEP)
    assert tree.sensitivity(SEP, ROUNDS) == pytest.approx(np.sqrt(k * SEP.bit_length()))
    assert max(_cyclic_patterns(tree_strategy(ROUNDS, SEP), SEP)) == \
        pytest.approx(tree.sensitivity(SEP, ROUNDS))
    ours = dp_accounting.rdp.RdpAccountant()
    ours.compose(tree.event(z, CYCLIC, ROUNDS))
    theirs = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    theirs.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SingleEpochTreeAggregationDpEvent(z, SEP), k))
    np.testing.assert_allclose(ours.get_epsilon(delta), theirs.get_epsilon(delta), rtol=1e-6)


@pytest.fixture(scope="module")
def at_epsilon_2():
    """Noise multipliers of epsilon 2 at delta 1e-5 (PLD) over ROUNDS cyclic rounds: DP-FedAvg's
    (a Gaussian per participation) and one Gaussian's (DP-FTRL's, per unit sensitivity)."""
    single = dp_accounting.calibrate_dp_mechanism(dp_accounting.pld.PLDAccountant,
                                                  dp_accounting.GaussianDpEvent, 2.0, 1e-5)
    # k Gaussians of noise z compose to one of z / sqrt(k): DP-FedAvg's over 3 participations.
    independent = single * np.sqrt(-(-ROUNDS // SEP))
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(fs.privacy.gaussian_event(independent, CYCLIC, ROUNDS))
    assert acc.get_epsilon(1e-5) == pytest.approx(2.0, rel=1e-3)
    return {"independent": independent, "single": single}


def test_the_calibrated_noise_meets_the_target_epsilon(mechanisms, at_epsilon_2):
    mech = mechanisms["blt"]
    z = dp_ftrl.noise_multiplier_for(mech, 2.0, CYCLIC, ROUNDS, 1e-5)
    assert z == pytest.approx(at_epsilon_2["single"] * mech.sensitivity(SEP, ROUNDS), rel=1e-3)
    for noise, within in ((z, True), (0.97 * z, False)):
        acc = dp_accounting.pld.PLDAccountant()
        acc.compose(mech.event(noise, CYCLIC, ROUNDS))
        assert (acc.get_epsilon(1e-5) <= 2.0 + 1e-6) == within


@pytest.mark.parametrize("name, ratio", [("tree", 0.9), ("banded", 0.5), ("blt", 0.5)])
def test_correlated_noise_beats_independent_noise_on_prefix_sums_at_the_same_epsilon(
        name, ratio, mechanisms, at_epsilon_2):
    """Total squared error of the released prefix sums (what the papers optimize), at epsilon
    2: DP-FedAvg under the same cyclic sampler adds independent noise, error z^2 sum_t t;
    DP-FTRL's is z'^2 ||B||_F^2, B = A C^{-1}. Three participations, 8 rounds apart: the
    tree (depth 4 per 8 rounds) gains least."""
    mech = mechanisms[name]
    z = at_epsilon_2["single"] * mech.sensitivity(SEP, ROUNDS)
    b = np.cumsum(np.asarray(mech.noising.materialize(ROUNDS), np.float64), 0)
    independent = at_epsilon_2["independent"] ** 2 * ROUNDS * (ROUNDS + 1) / 2
    assert z ** 2 * np.sum(b ** 2) < ratio * independent


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(noise_multiplier=-1.0), ValueError, "noise_multiplier must be a finite number >= 0"),
    (dict(clip_norm=0.0), ValueError, "clip_norm must be a finite number > 0"),
    (dict(expected_weight=0), ValueError, "expected_weight must be a finite number > 0"),
    (dict(mech="tree"), TypeError, "mech must be a fs.dp_ftrl.Mechanism"),
])
def test_bad_stage_arguments_are_named(kwargs, error, message, mechanisms):
    args = dict(noise_multiplier=1.0, clip_norm=1.0, expected_weight=5.0,
                mech=mechanisms["tree"]) | kwargs
    with pytest.raises(error, match=message):
        dp_ftrl.dp_ftrl_mean(**args)


def test_bad_mechanisms_and_unaccountable_participation_are_refused(mechanisms):
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        dp_ftrl.mechanism("tree", 0, 4)
    with pytest.raises(ValueError, match="min_sep must be >= 1"):
        dp_ftrl.mechanism("tree", 10, 0)
    with pytest.raises(ValueError, match="mechanism must be 'tree', 'banded' or 'blt'"):
        dp_ftrl.mechanism("honaker", 10, 4)
    with pytest.raises(ValueError, match="bands is for the banded mechanism"):
        dp_ftrl.mechanism("tree", 10, 4, bands=2)
    with pytest.raises(ValueError, match="non-increasing"):
        dp_ftrl.mechanism("banded", 10, 4, strategy=[0.3, 0.6])
    with pytest.raises(TypeError, match="BufferedToeplitz"):
        dp_ftrl.mechanism("blt", 10, 4, strategy=[0.5])
    stage = dp_ftrl.dp_ftrl_mean(1.0, 1.0, 5.0, mechanisms["blt"])
    for participation in (Participation("poisson", 40, 5.0), Participation("fixed", 40, 5)):
        with pytest.raises(ValueError, match=f"{participation.kind}.*guarantees no separation"):
            stage.privacy(participation, 10)
        with pytest.raises(ValueError, match="guarantees no separation"):
            fs.privacy.Ledger(stage.privacy, participation, delta=1e-5)
    with pytest.raises(ValueError, match=f"built for {ROUNDS} rounds, not {ROUNDS + 1}"):
        stage.privacy(CYCLIC, ROUNDS + 1)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        stage.privacy(CYCLIC, 0)
    with pytest.raises(ValueError, match="restarts every 8 rounds.*after 4 rounds"):
        mechanisms["tree"].event(1.0, Participation("cyclic", 40, 10), 10)
    with pytest.raises(ValueError, match="dp_ftrl_mean counts each client once"):
        agg.chain(agg.weight_by("num_examples"), stage)


def test_under_the_engine_round_one_is_dp_fedavgs_round_on_8_devices(mechanisms):
    """C[0, 0] = 1 for the BLT (and the tree): its first round is DP-FedAvg's, the clipped sum
    over the expected weight plus the noise drawn from the same round key, on 8 devices as
    DP-FedAvg's on 1 (`_dp_round` checks DP-FedAvg's against the clipped reference)."""
    noised = _dp_round(3, False, 1.0)[1]
    chain = agg.chain(agg.clip(0.4), agg.weight_by("uniform"),
                      dp_ftrl.dp_ftrl_mean(1.0, 0.4, 10.0, mechanisms["blt"]))
    new = _engine_round(chain, 1, True)[1]
    for k in new.params:
        np.testing.assert_allclose(new.params[k], noised.params[k], rtol=1e-5, atol=1e-6)
    assert int(new.agg_state[-1].round) == 1


@pytest.mark.slow  # a whole run: CI runs it with the slow tests
def test_a_cyclic_run_carries_the_noise_state_and_resumes_with_the_same_bits(mechanisms,
                                                                            tmp_path):
    train, _ = fs.data.synthetic(num_clients=12, seed=0)
    model = fs.models.logistic_regression(60, 10)
    mech = mechanisms["blt"]
    chain = agg.chain(agg.clip(0.5), agg.weight_by("uniform"),
                      dp_ftrl.dp_ftrl_mean(0.5, 0.5, 3.0, mech))
    algo = fs.algorithms.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=8,
                                aggregator=chain)
    kwargs = dict(sampler=fs.sampling.cyclic(12, 3), chunk_size=3, progress=False)
    whole = fs.simulate(algo, train, rounds=6, **kwargs)
    fs.simulate(algo, train, rounds=4, output_dir=tmp_path, **kwargs)
    resumed = fs.simulate(algo, train, rounds=6, output_dir=tmp_path, resume=True, **kwargs)
    assert_trees_equal(whole.state.agg_state, resumed.state.agg_state)
    assert_trees_equal(whole.params, resumed.params)
    state = whole.state.agg_state[-1]
    assert int(state.round) == 6
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(state.noise)
               if np.issubdtype(np.asarray(x).dtype, np.floating))
    stddev = [r["server"]["noise_stddev"] for r in whole.history]
    np.testing.assert_allclose(stddev, 0.5 * 0.5 * mech.increment_stddev[:6] / 3.0, rtol=1e-5)
    assert [r["epsilon"] for r in whole.history] == [
        fs.privacy.Ledger(chain.privacy, kwargs["sampler"].participation).epsilon(r)
        for r in range(1, 7)]
    with pytest.raises(ValueError, match="Poisson"):  # refused before anything compiles
        fs.Simulation(algo, train, sampler=fs.sampling.poisson(12, 3), progress=False)
    sim = fs.Simulation(algo, train, **kwargs)
    with pytest.raises(ValueError, match=f"{ROUNDS}"):  # past the rounds it was built for
        sim.run(ROUNDS + 1)
    assert sim.round == 0
