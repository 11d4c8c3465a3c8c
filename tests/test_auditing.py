"""Privacy auditing with canary clients: the estimator against the Gaussian mechanism's math
(dp-accounting) and a numerical integral, the canaries under the engine, and whole runs: a
non-private one shows a large empirical epsilon, a DP one stays below its accountant's."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import fedjax_sim as fs
from fedjax_sim import aggregators as agg
from fedjax_sim import auditing
from fedjax_sim.engine import ClientContext, replicate
from fedjax_sim.testing import round_inputs

D = 610  # logistic regression 60 -> 10


def _grid(n):
    """n standard normal 'samples' at evenly spaced quantiles: a score set whose fitted
    Gaussian is known (the same std for every such set)."""
    return scipy.stats.norm.ppf((np.arange(n) + 0.5) / n)


@pytest.mark.parametrize("mu, delta", [(0.5, 1e-3), (1.0, 1e-5), (3.0, 1e-5)])
def test_equal_std_scores_give_the_gaussian_mechanism_epsilon(mu, delta):
    """In and out scores N(mu s, s^2) and N(0, s^2): the Gaussian mechanism of sensitivity 1
    and noise 1 / mu, by dp-accounting's exact curve and (slightly above) its PLD."""
    base = _grid(20_000)
    s = base.std(ddof=1)
    got = auditing.epsilon_from_scores(0.3 * (mu * s + base), 0.3 * base, delta)
    want = dp_accounting.get_epsilon_gaussian(1 / mu, delta)
    assert got == pytest.approx(want, rel=1e-6)
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.GaussianDpEvent(1 / mu))
    assert want <= pld.get_epsilon(delta) <= want * 1.01
    # shifting both sets, or scaling them together, changes nothing
    assert auditing.epsilon_from_scores(mu * s + base + 7, base + 7, delta) == pytest.approx(
        want, rel=1e-6)


@pytest.mark.parametrize("p, q", [((0.0, 1.0), (0.5, 1.3)), ((0.0, 0.04), (0.02, 0.03)),
                                  ((0.0, 1.0), (2.0, 0.7))])
def test_unequal_stds_meet_delta_by_the_integrated_hockey_stick(p, q):
    """At the epsilon returned, the larger hockey-stick divergence of the two orders,
    integrated numerically, is delta."""
    delta = 1e-3
    eps = auditing.epsilon_of_gaussians(*p, *q, delta)
    y = np.linspace(-60, 60, 400_001) * max(p[1], q[1]) + p[0]

    def divergence(a, b, e):
        gap = scipy.stats.norm.pdf(y, *a) - math.exp(e) * scipy.stats.norm.pdf(y, *b)
        return np.trapezoid(np.maximum(gap, 0.0), y)

    assert max(divergence(p, q, eps), divergence(q, p, eps)) == pytest.approx(delta, rel=1e-4)
    assert max(divergence(p, q, eps * 0.9), divergence(q, p, eps * 0.9)) > delta
    # the same means with equal stds are less distinguishable than with the stds apart
    assert auditing.epsilon_of_gaussians(p[0], q[1], q[0], q[1], delta) < eps


def test_the_same_gaussian_twice_is_epsilon_zero():
    assert auditing.epsilon_of_gaussians(0.0, 1.0, 0.0, 1.0, 1e-5) == 0.0


def _outputs(num):
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((num, 60, 10)).astype(np.float32),
            "b": rng.standard_normal((num, 10)).astype(np.float32)}


def test_the_stage_replaces_exactly_the_canaries_outputs():
    """Population positions 5..7 are canaries (of 8 clients); 8 is a padding id. A canary
    sends norm * its direction; every other client's output passes bit for bit."""
    canaries = auditing.Canaries(first=5, count=3, seed=11)
    stage = auditing.canary_stage(canaries, 0.5)
    outputs = _outputs(9)
    for c in range(9):
        ctx = ClientContext(jnp.int32(c), jax.random.key(c), jnp.int32(3), jnp.int32(1))
        mine = {k: jnp.asarray(v[c]) for k, v in outputs.items()}
        out, weight, metrics = stage.client(mine, jnp.float32(1.0), ctx, ())
        assert float(weight) == 1.0 and bool(metrics["canary"]) == (5 <= c < 8)
        if 5 <= c < 8:
            want = auditing.direction(11, c - 5, mine)
            for k in out:
                np.testing.assert_array_equal(out[k], 0.5 * want[k])
            norm = math.sqrt(sum(float(jnp.sum(jnp.square(v))) for v in out.values()))
            assert norm == pytest.approx(0.5, rel=1e-6)
        else:
            for k in out:
                np.testing.assert_array_equal(out[k], outputs[k][c])
    a, b = (auditing.direction(11, i, mine) for i in (0, 1))
    assert abs(float(sum(jnp.vdot(a[k], b[k]) for k in a))) < 5 / math.sqrt(D)
    other_seed = auditing.direction(12, 0, mine)
    assert not np.allclose(a["w"], other_seed["w"])


def test_held_out_directions_are_uniform_on_the_sphere_and_the_canary_scores_its_push():
    """Cosines of uniform directions with a fixed vector are ~N(0, 1/d) (mean 0, E[cos^2] =
    1/d exactly); a server that moved along minus canary 0's direction scores it 1."""
    template = {"w": jnp.zeros((60, 10)), "b": jnp.zeros(10)}
    seed = 2**32 - 1  # the largest a run takes
    canaries = auditing.Canaries(first=100, count=4, seed=seed)
    push = auditing.direction(seed, 0, template)
    final = jax.tree.map(lambda p, u: p - 2.0 * u, template, push)
    inside, outside = auditing.scores(template, final, canaries, 2000)
    assert inside[0] == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.abs(inside[1:]) < 5 / math.sqrt(D))
    assert abs(outside.mean()) < 4 / math.sqrt(2000 * D)
    assert np.mean(outside**2) * D == pytest.approx(1.0, abs=0.1)
    assert scipy.stats.kstest(outside * math.sqrt(D), "norm").pvalue > 0.01


def test_canaries_under_the_engine_move_the_server_by_their_directions():
    """One DP-FedAvg round without noise, 6 real clients and the 4 canaries, on 8 devices in
    chunks of 1, against the same round without the canaries: the difference is exactly
    -sum_j C u_j / W, and the real clients' part is the same."""
    train, _ = fs.data.synthetic(1.0, 1.0, num_clients=6, num_examples=12, seed=2)
    data, canaries = auditing.with_canaries(train, 4, seed=9)
    c, w = 0.3, 5.0
    chain = agg.chain(auditing.canary_stage(canaries, c), agg.clip(c), agg.weight_by("uniform"),
                      agg.dp_mean(0.0, c, w))
    model = fs.models.logistic_regression(60, 10)
    algo = fs.algorithms.fedavg(model, optax.sgd(0.1), batch_size=4, shuffle=False,
                                aggregator=chain)
    engine = fs.Engine(1, fs.client_mesh())
    params = jax.tree.map(lambda p: p + 0.05, model.init(None))
    state = replicate(algo.init(params, jax.random.key(0)), engine)
    step = jax.jit(lambda s, i: algo.round(s, i, (), engine=engine))

    def moved(indices):
        inputs, _, _ = round_inputs(algo, data, indices, engine=engine, cohort_size=16)
        new, _, metrics = step(state, inputs)
        flags = np.asarray(metrics.clients["canary"])[:len(indices)]
        np.testing.assert_array_equal(flags, np.asarray(indices) >= 6)
        return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b), new.params,
                            params)

    with_canaries, without = moved(np.arange(10)), moved(np.arange(6))
    pushes = [auditing.direction(9, j, params) for j in range(4)]
    for k in params:
        want = -sum(c * np.asarray(u[k], np.float64) for u in pushes) / w
        np.testing.assert_allclose(with_canaries[k] - without[k], want, rtol=1e-4, atol=1e-7)


def _run(num_canaries, noise, clip, rounds, seed):
    """Logistic regression on 400 Synthetic(1, 1) clients (18 examples each) plus canaries,
    DP-FedAvg's chain with the canary stage first, Poisson sampling of 10% a round."""
    train, _ = fs.data.synthetic(1.0, 1.0, num_clients=400, num_examples=20, seed=0)
    train, canaries = auditing.with_canaries(train, num_canaries, seed=seed)
    expected = 0.1 * train.num_clients
    chain = agg.chain(auditing.canary_stage(canaries, clip), agg.clip(clip),
                      agg.weight_by("uniform"), agg.dp_mean(noise, clip, expected))
    model = fs.models.logistic_regression(60, 10)
    algo = fs.algorithms.fedavg(model, optax.sgd(0.1), batch_size=10, aggregator=chain)
    sampler = fs.sampling.poisson(train.num_clients, expected)
    params = model.init(jax.random.key(0))
    result = fs.simulate(algo, train, rounds=rounds, sampler=sampler, params=params,
                         seed=seed, chunk_size=8, progress=False)
    return params, result, canaries, algo, sampler


@pytest.mark.slow  # a whole run: CI runs it with the slow tests
def test_a_non_private_run_shows_a_large_empirical_epsilon(capsys):
    """No noise and a clip far above the updates: the 20 canaries stand out of the final
    model (cosines ~5 held-out stds up), an estimate far past any useful guarantee, and a
    confident lower bound near the most 20 canaries can show."""
    params, result, canaries, algo, sampler = _run(20, 0.0, 100.0, 40, seed=0)
    for record in result.history:  # the stage flags the sampled canaries and no one else
        flags = np.asarray(record["clients"]["canary"], bool)
        ids = np.asarray(record["clients"]["client_id"])
        np.testing.assert_array_equal(flags, np.char.startswith(ids.astype(str), "canary:"))
    assert sum(sum(r["clients"]["canary"]) for r in result.history) > 40
    out = auditing.report(params, result, canaries, algo, sampler)
    audit = out["audit"]
    assert out["accountant_epsilon"] == math.inf
    assert audit.mu > 3 and out["empirical_epsilon"] > 20
    assert out["epsilon_lower_bound"] > 2
    assert audit.in_scores.shape == (20,) and audit.out_scores.shape == (1000,)
    assert "accountant's epsilon inf" in capsys.readouterr().out


@pytest.mark.slow  # a whole run: CI runs it with the slow tests
def test_a_dp_run_stays_below_the_accountants_epsilon(capsys):
    """Noise multiplier 0.7, clip 1, 10% Poisson sampling, 40 rounds, 200 canaries: the
    canaries are seen (mu well above 0) but the estimate stays below the accountant's epsilon
    at the same delta (measured over seeds 0-5: 2.4-3.3 against 6.4), as does the confident
    lower bound."""
    params, result, canaries, algo, sampler = _run(200, 0.7, 1.0, 40, seed=1)
    out = auditing.report(params, result, canaries, algo, sampler)
    ledger = fs.privacy.Ledger(algo.aggregator.privacy, sampler.participation)
    assert out["accountant_epsilon"] == ledger.epsilon(40) and out["delta"] == ledger.delta
    assert out["audit"].mu > 0.3
    assert 0 < out["epsilon_lower_bound"] <= out["empirical_epsilon"]
    assert out["empirical_epsilon"] < out["accountant_epsilon"]
    printed = capsys.readouterr().out
    assert f"{out['accountant_epsilon']:.3g}" in printed and "200 canaries" in printed


def test_bad_input_is_named():
    train, _ = fs.data.synthetic(1.0, 1.0, num_clients=5, num_examples=4, seed=0)
    with pytest.raises(ValueError, match="num_canaries 6 is more than the 5 clients"):
        auditing.with_canaries(train, 6, seed=0)
    with pytest.raises(ValueError, match="num_canaries must be >= 2"):
        auditing.with_canaries(train, 1, seed=0)
    with pytest.raises(TypeError, match="num_canaries must be an integer"):
        auditing.with_canaries(train, 2.0, seed=0)
    with pytest.raises(TypeError, match="FederatedData"):
        auditing.with_canaries({"a": {}}, 2, seed=0)
    data, canaries = auditing.with_canaries(train, 3, seed=0)
    assert data.num_clients == 8 and data.client_ids[-1] == "canary:2"
    assert canaries.positions.tolist() == [5, 6, 7] and data.num_examples[-3:].tolist() == [1] * 3
    with pytest.raises(ValueError, match="already has a client named 'canary:0'"):
        auditing.with_canaries(data, 2, seed=0)
    with pytest.raises(ValueError, match="norm must be a finite number > 0"):
        auditing.canary_stage(canaries, 0.0)
    with pytest.raises(TypeError, match="canaries must be the Canaries"):
        auditing.canary_stage((5, 3, 0), 1.0)

    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    final = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    for delta in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="delta must be"):
            auditing.empirical_epsilon(params, final, canaries, delta)
    with pytest.raises(ValueError, match="different trees"):
        auditing.empirical_epsilon(params, {"w": final["w"]}, canaries, 1e-3)
    with pytest.raises(ValueError, match="leaves of other shapes"):
        auditing.empirical_epsilon(params, {"w": jnp.ones((2, 3)), "b": final["b"]},
                                   canaries, 1e-3)
    with pytest.raises(ValueError, match="no direction to score"):
        auditing.empirical_epsilon(params, params, canaries, 1e-3)
    with pytest.raises(ValueError, match="significance must be in"):
        auditing.empirical_epsilon(params, final, canaries, 1e-3, significance=0.5)
    with pytest.raises(ValueError, match="in_scores must be at least 2 finite numbers"):
        auditing.epsilon_from_scores([0.1], [0.0, 0.2], 1e-3)
