"""Secure aggregation and distributed DP against plain numpy sums, the ring's arithmetic, the
graph's definition and the mechanisms' exact Renyi divergences."""

import math
import warnings

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special, stats
from test_aggregators import population

import fedjax_sim as fs
from fedjax_sim import aggregators as agg
from fedjax_sim import secagg as sa
from fedjax_sim.aggregators import Reduced, sum_rows, weighted_sum_rows
from fedjax_sim.engine import ClientContext
from fedjax_sim.testing import reference_round, round_inputs

COHORT_KEY = jax.random.key(99)


def client_key(c):
    return jax.random.key(1000 + c)


def run(stage, x, weights, chunks=((0, 3), (3, 7), (7, 10))):
    """The chain's client part on each client (slots and participants as the engine gives
    them), reduced chunk by chunk as the engine does, and the server part: (value, server
    metrics, per-client outputs, per-client metrics, reduced)."""
    chain = agg.chain(agg.weight_by("uniform"), stage)
    state = chain.init(jnp.zeros(x.shape[1:]))
    part = weights > 0
    slots = np.where(part, np.cumsum(part) - 1, -1)
    per, client = [], jax.jit(chain.client)
    for c in range(len(weights)):
        ctx = ClientContext(jnp.int32(c), client_key(c), jnp.int32(1), jnp.int32(1), (),
                            jnp.int32(slots[c]), jnp.int32(part.sum()), COHORT_KEY)
        per.append(client(jnp.asarray(x[c]), jnp.float32(weights[c]), ctx, state))
    out, w, metrics = jax.tree.map(lambda *v: jnp.stack(v), *per)
    parts = [Reduced(jax.tree.map(lambda o, a=a, b=b: weighted_sum_rows(w[a:b], o[a:b]), out),
                     sum_rows(w[a:b])) for a, b in chunks]
    reduced = parts[0]
    for p in parts[1:]:
        reduced = jax.tree.map(jnp.add, reduced, p)
    value, _, server = chain.server(reduced, state, jax.random.key(0))
    return value, server, out, metrics, reduced


def plain_quantized(x, clip_norm, scale):
    """Each client's quantized vector computed plainly: numpy clipping, the stage's rounding
    from the same key."""
    rows = []
    for c in range(len(x)):
        v = x[c].astype(np.float32)
        v = v * np.float32(min(1.0, clip_norm / max(np.sqrt(np.sum(v.astype(np.float64) ** 2)),
                                                    1e-30)))
        key = jax.random.fold_in(jax.random.fold_in(client_key(c), sa._SALT), 0)
        rows.append(np.asarray(sa.stochastic_round([jnp.asarray(v)], key, scale)[0],
                               np.int64))
    return np.stack(rows)


def signed_mod(total, bits):
    r = np.mod(total, 2**bits)
    return np.where(r >= 2 ** (bits - 1), r - 2**bits, r)


def data(c=10, d=37, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((c, d)).astype(np.float32) * rng.uniform(0.05, 0.6, (c, 1))
    weights = np.ones(c, np.float32)
    weights[[4, 9]] = 0  # a client of no step and a padding slot: not participants
    return x.astype(np.float32), weights


@pytest.mark.parametrize("bits, dropout", [(32, 0.0), (12, 0.3)])
def test_unmasked_sum_is_the_plain_quantized_sum_bit_for_bit(bits, dropout):
    x, w = data()
    clip = 4.0  # above every norm: the clip factor is exactly 1, as in plain_quantized
    stage = sa.secagg(clip, 10, bits=bits, dropout=dropout, degree=4, threshold=1, masks=True)
    scale = 1.0 * (min((2 ** (bits - 1) - 1) // 10 - 1, sa.MAX_LEVELS)) / clip
    value, server, out, metrics, reduced = run(stage, x, w)
    assert not np.asarray(metrics["clipped"]).any()
    dropped = np.asarray(metrics["secagg_dropped"])
    assert (dropped.any() == (dropout > 0)) and not dropped[w == 0].any()
    survivors = (w > 0) & ~dropped
    q = plain_quantized(x, clip, scale)
    expect = signed_mod(q[survivors].sum(0), bits)
    ring = (reduced.output["ring"] - reduced.output["leftover"]) & jnp.uint32(2**bits - 1)
    np.testing.assert_array_equal(np.asarray(sa.to_signed(ring, bits)), expect)
    assert int(server["secagg_unrecoverable"]) == 0
    assert int(server["secagg_dropped"]) == dropped.sum()
    np.testing.assert_allclose(value, expect / scale / survivors.sum(), rtol=1e-6, atol=1e-9)
    # Each survivor's message is masked (not its quantized vector), yet the masks cancel.
    sent = np.asarray(out["ring"], np.int64)
    masks = sent[survivors] - np.mod(q[survivors], 2**bits)
    assert np.all(np.any(np.mod(masks, 2**bits) != 0, axis=1))
    left = np.asarray(reduced.output["leftover"], np.int64)
    assert np.all(np.mod(masks.sum(0) - left, 2**bits) == 0)
    assert float(server["secagg_bits_per_client"]) == bits * x.shape[1]
    # No masks: the same sum, to the bit.
    plain = run(sa.secagg(clip, 10, bits=bits, dropout=dropout, degree=4, threshold=1), x, w)
    np.testing.assert_array_equal(plain[4].output["ring"] & jnp.uint32(2**bits - 1), ring)


def test_the_graph_is_the_harary_graph_over_the_participants():
    graph = jax.jit(sa.neighbours, static_argnums=(3, 4))
    for n, half in [(9, 2), (5, 3), (4, 3), (2, 1), (30, 4)]:
        key = jax.random.key(n)
        adj = np.zeros((n, n), bool)
        for s in range(n):
            nb, valid = graph(key, jnp.int32(s), jnp.int32(n), half, 40)
            for j, v in zip(np.asarray(nb), np.asarray(valid), strict=True):
                if v:
                    assert j != s and 0 <= j < n and not adj[s, j]
                    adj[s, j] = True
        assert (adj == adj.T).all()  # a pair's mask is added by one and subtracted by the other
        np.testing.assert_array_equal(adj.sum(1), min(2 * half, n - 1))


def test_a_missing_survivor_threshold_fails_the_round_loudly():
    x, w = data()
    stage = sa.secagg(0.5, 10, degree=4, threshold=4, dropout=0.4)
    value, server, _, metrics, _ = run(stage, x, w)
    # A client's seeds are rebuilt iff >= threshold of its neighbours survived.
    part = w > 0
    n = int(part.sum())
    dropped = np.asarray(metrics["secagg_dropped"])[part]
    short = 0
    for s in range(n):
        nb, valid = sa.neighbours(jax.random.fold_in(jax.random.fold_in(COHORT_KEY, sa._SALT),
                                                     0), jnp.int32(s), jnp.int32(n), 2, 10)
        alive = sum(bool(v) and not dropped[j] for j, v in zip(np.asarray(nb),
                                                               np.asarray(valid), strict=True))
        short += alive < 4
    assert short > 0 and int(server["secagg_unrecoverable"]) == short
    np.testing.assert_array_equal(value, np.zeros(x.shape[1]))  # nothing is applied


def test_stochastic_rounding_is_unbiased_and_rounds_to_a_neighbour():
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, 6).astype(np.float32))
    scale, draws = 3.0, 4000
    q = jax.vmap(lambda k: sa.stochastic_round([x], k, scale)[0])(
        jax.random.split(jax.random.key(5), draws))
    y = np.asarray(x, np.float64) * scale
    assert set(np.unique(q - np.floor(y))) == {0, 1}
    np.testing.assert_allclose(np.asarray(q).mean(0) / scale, np.asarray(x),
                               atol=4 * 0.5 / math.sqrt(draws) / scale)


def test_conditional_rounding_stays_within_the_bound():
    x = jnp.full((400,), 0.025, jnp.float32)  # halves at scale 20: the widest rounding
    bound = sa.rounded_l2_bound(10.0, 400, 0.9)
    q = jax.vmap(lambda k: sa.stochastic_round([x * 20], k, 1.0, bound)[0])(
        jax.random.split(jax.random.key(1), 200))
    norms = np.sqrt((np.asarray(q, np.float64) ** 2).sum(1))
    assert norms.max() <= bound
    free = jax.vmap(lambda k: sa.stochastic_round([x * 20], k, 1.0)[0])(
        jax.random.split(jax.random.key(1), 200))
    assert np.sqrt((np.asarray(free, np.float64) ** 2).sum(1)).max() > bound  # it did retry


def test_overflow_is_reported():
    x, w = data()
    stage = sa.secagg(0.5, 10, bits=10, noise="skellam", noise_multiplier=30.0,
                      expected_weight=8.0, dimension=37)
    _, server, _, _, _ = run(stage, x, w)
    assert float(server["secagg_overflow_bound"]) > 1  # the noise can wrap the sum
    quiet = sa.secagg(0.5, 10, bits=32)
    _, server, _, _, _ = run(quiet, x, w)
    scale = min((2**31 - 1) // 10 - 1, sa.MAX_LEVELS) / 0.5
    q = plain_quantized(x, 0.5, scale)[w > 0]
    # Without noise, |q_i| <= ||y||_2 + 1 bounds each client's largest entry, no extra pass.
    norms = np.minimum(np.sqrt((x[w > 0].astype(np.float64) ** 2).sum(1)), 0.5)
    bound = float(server["secagg_overflow_bound"])
    np.testing.assert_allclose(bound, (np.floor(norms * scale) + 1).sum() / 2**31, rtol=1e-5)
    assert np.abs(q).max(1).sum() / 2**31 <= bound < 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(clip_norm=1.0, max_clients=1000, bits=8), "too small for 1000 clients"),
    (dict(clip_norm=1.0, max_clients=100, bits=16, scale=400.0), "too small for 100 clients"),
    (dict(clip_norm=1.0, max_clients=5, threshold=5), "threshold 5 is larger than the cohort"),
    (dict(clip_norm=1.0, max_clients=50, degree=4, threshold=6), "larger than the cohort"),
    (dict(clip_norm=1.0, max_clients=5, dropout=1.0), "dropout is a probability"),
    (dict(clip_norm=1.0, max_clients=5, noise="laplace"), "noise must be"),
    (dict(clip_norm=1.0, max_clients=5, noise="skellam", noise_multiplier=1.0,
          dimension=3), "fixed expected_weight"),
    (dict(clip_norm=1.0, max_clients=5, noise="skellam", noise_multiplier=1.0,
          expected_weight=5.0), "dimension"),
    (dict(clip_norm=0.0, max_clients=5), "clip_norm must be a finite number > 0"),
    (dict(clip_norm=1.0, max_clients=10, scale=2e5, noise="skellam", noise_multiplier=1.0,
          expected_weight=10.0, dimension=100), "noise would have variance"),
])
def test_bad_configurations_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sa.secagg(**kwargs)


def test_example_weights_and_a_wrong_dimension_are_refused():
    with pytest.raises(ValueError, match="secagg counts each client once"):
        agg.chain(agg.weight_by("num_examples"), sa.secagg(1.0, 10))
    stage = sa.secagg(1.0, 10, noise="skellam", noise_multiplier=1.0, expected_weight=10.0,
                      dimension=5)
    with pytest.raises(ValueError, match="dimension=5 but the update has 6"):
        stage.init(jnp.zeros(6))


def test_skellam_and_discrete_gaussian_noise_have_their_distributions():
    key = jax.random.key(2)
    sk = np.asarray(jax.jit(lambda k: sa.skellam_noise(k, (200_000,), 50.0))(key))
    assert sk.dtype == np.int32
    assert abs(sk.mean()) < 0.05 and abs(sk.var() / 50 - 1) < 0.02
    support = np.arange(-40, 41)
    freq = np.array([(sk == v).mean() for v in support])
    np.testing.assert_allclose(freq, stats.skellam.pmf(support, 25, 25), atol=2e-3)
    s = 3.0
    dg = np.asarray(jax.jit(lambda k: sa.discrete_gaussian_noise(k, (200_000,), s))(key))
    assert dg.dtype == np.int32
    support = np.arange(-20, 21)
    pmf = np.exp(-support**2 / (2 * s * s))
    pmf /= pmf.sum()
    np.testing.assert_allclose([(dg == v).mean() for v in support], pmf, atol=2e-3)
    assert abs(dg.var() / (pmf @ support**2) - 1) < 0.02


def _renyi(p_log, q_log, alpha):
    """D_alpha(P || Q) of two pmfs on the same support, in log space (where both are
    representable: the rest is below float64's smallest number)."""
    ok = np.isfinite(p_log) & np.isfinite(q_log)
    return special.logsumexp(alpha * p_log[ok] + (1 - alpha) * q_log[ok]) / (alpha - 1)


def test_the_skellam_bound_holds_and_approaches_the_gaussian():
    """Against the exact Renyi divergence of Sk shifted by the sensitivity (1-D: D1 = D2)."""
    k = np.arange(-4000, 4001)
    for mu, shift in [(40.0, 3), (400.0, 5)]:
        p = stats.skellam.logpmf(k, mu / 2, mu / 2)
        q = stats.skellam.logpmf(k - shift, mu / 2, mu / 2)
        for a in (2, 5, 16):
            exact = _renyi(p, q, a)
            bound = sa.skellam_rdp(a, shift, shift, mu)
            assert exact <= bound
            assert bound <= exact * (1.3 if mu < 100 else 1.05)
    # The stage's accounting tends to the Gaussian mechanism's at the same orders.
    z, rounds, delta = 1.2, 50, 1e-6
    gauss = dp_accounting.rdp.RdpAccountant(orders=sa.SKELLAM_ORDERS)
    gauss.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), rounds))
    want = gauss.get_epsilon(delta)
    part = fs.sampling.Participation("poisson", 1000, 100)
    fine = sa.secagg(1.0, 100, bits=32, noise="skellam", noise_multiplier=z,
                     expected_weight=100.0, dimension=1000)
    assert want < fine.privacy(part, rounds).epsilon(delta) < want * 1.001  # ~5e4 levels
    # A handful of levels: a small Skellam variance, whose corrections cost.
    coarse = sa.secagg(1.0, 2, bits=6, noise="skellam", noise_multiplier=z,
                       expected_weight=2.0, dimension=1)
    assert coarse.privacy(part, rounds).epsilon(delta) > want * 1.005


def test_the_distributed_discrete_gaussian_tends_to_the_gaussian():
    # One discrete Gaussian is exactly as private as the Gaussian (Canonne et al. 2020).
    s, shift = 4.0, 3
    k = np.arange(-400, 401)
    p = -(k**2) / (2 * s * s)
    p -= special.logsumexp(p)
    q = -((k - shift) ** 2) / (2 * s * s)
    q -= special.logsumexp(q)
    rho = sa.ddg_rho(shift, shift, s, 1, 1)
    assert rho == shift**2 / (2 * s * s)
    for a in (2, 8):
        np.testing.assert_allclose(_renyi(p, q, a), a * rho, rtol=1e-6)
    # Many clients: tau adds a term that vanishes as the local noise grows.
    assert sa.ddg_rho(10.0, 30.0, 0.3, 100, 1000) > 10.0**2 / (2 * 100 * 0.09) * 1.01
    np.testing.assert_allclose(sa.ddg_rho(10.0, 30.0, 2.0, 100, 1000), 100 / (2 * 400),
                               rtol=1e-9)
    z = 1.0
    stage = sa.secagg(1.0, 100, noise="discrete_gaussian", noise_multiplier=z,
                      expected_weight=100.0, dimension=1000)
    part = fs.sampling.Participation("poisson", 1000, 100)
    ledger = fs.privacy.Ledger(stage.privacy, part, delta=1e-6)
    assert ledger.accountant == "rdp"  # PLD does not compose zCDP
    gauss = dp_accounting.rdp.RdpAccountant()
    gauss.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), 10))
    np.testing.assert_allclose(ledger.epsilon(10), gauss.get_epsilon(1e-6), rtol=1e-3)


def test_the_ledger_accounts_skellam_rounds_and_replace_one_costs_more():
    stage = sa.secagg(1.0, 100, bits=20, noise="skellam", noise_multiplier=1.0,
                      expected_weight=100.0, dimension=500)
    poisson = fs.privacy.Ledger(stage.privacy, fs.sampling.Participation("poisson", 10_000,
                                                                           100))
    assert poisson.accountant == "rdp"
    assert 0 < poisson.epsilon(1) < poisson.epsilon(10) < math.inf
    fixed = fs.privacy.Ledger(stage.privacy, fs.sampling.Participation("fixed", 10_000, 100))
    assert fixed.epsilon(10) > poisson.epsilon(10)  # twice the sensitivity
    with pytest.raises(ValueError, match="PLD accountant does not cover RdpCurve"):
        fs.privacy.Ledger(stage.privacy, fs.sampling.Participation("poisson", 10_000, 100),
                          accountant="pld")


def _engine_sums(chunk, mesh):
    """The reduced sums of a pass whose clients send fixed outputs (from their ids), through
    the engine's scan, vmap and psum with SecAgg (masks, dropouts, Skellam noise)."""
    data = population()
    model = fs.models.logistic_regression(4, 3)
    algo = fs.algorithms.fedavg(model, optax.sgd(0.3), batch_size=4, shuffle=False)
    engine = fs.Engine(chunk, fs.client_mesh() if mesh else None)
    inputs, _, _ = round_inputs(algo, data, np.arange(8), engine=engine)
    update = fs.ClientUpdate(
        init=lambda bcast, ctx: (), step=lambda local, batch, mask: local,
        finalize=lambda bcast, local, ctx: fs.ClientResult(
            output=0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(7), ctx.id),
                                           (37,))))
    chain = agg.chain(agg.weight_by("uniform"),
                      sa.secagg(0.5, 8, bits=24, degree=4, threshold=1, dropout=0.3,
                                masks=True, noise="skellam", noise_multiplier=0.5,
                                expected_weight=8.0, dimension=37))
    run = jax.jit(lambda c, p, k: fs.engine.run_clients(
        update, c, p, (), k, engine=engine, aggregator=chain,
        agg_state=chain.init(jnp.zeros(37))))
    result = run(inputs.cohort, inputs.pool, jax.random.key(3))
    return result.reduced, np.asarray(result.metrics["secagg_dropped"])


@pytest.mark.slow  # three layouts compiled: CI runs it with the slow tests
def test_the_engines_integer_sums_are_the_same_on_every_layout():
    # K > 1 on one device, K = 1 on 8 devices
    (base, dropped), *others = [_engine_sums(k, m) for k, m in [(3, False), (1, True)]]
    assert 0 < dropped[:8].sum() < 8 and not dropped[8:].any()  # padding is no participant
    for reduced, d in others:
        np.testing.assert_array_equal(d[:8], dropped[:8])
        for name in ("ring", "leftover", "included", "survivors", "unrecoverable"):
            np.testing.assert_array_equal(reduced.output[name], base.output[name])
        assert reduced.output["ring"].dtype == jnp.uint32


def test_secagg_fedavg_round_moves_by_the_survivors_clipped_mean():
    """Against the plain reference's per-client deltas, clipped by hand, over the clients
    that did not drop (some clipped, some dropped)."""
    data = population()
    model = fs.models.logistic_regression(4, 3)
    params = jax.tree.map(lambda p: p + 0.1, model.init(None))
    stage = sa.secagg(0.4, 8, bits=32, degree=4, threshold=1, dropout=0.3)
    algo = fs.algorithms.fedavg(model, optax.sgd(0.3), batch_size=4, shuffle=False,
                                aggregator=agg.chain(agg.weight_by("uniform"), stage))
    engine = fs.Engine(3)
    inputs, cohort, pool = round_inputs(algo, data, np.arange(8), engine=engine)
    state = algo.init(params, jax.random.key(0))
    new, _, metrics = jax.jit(lambda s, i: algo.round(s, i, (), engine=engine))(state, inputs)
    sgd = optax.sgd(1.0)
    _, _, ref = reference_round(model, optax.sgd(0.3), sgd, params, sgd.init(params), cohort,
                                pool, jax.random.fold_in(jax.random.key(0), 0),
                                cohort.batch_size)
    deltas = ref["delta"][:8]
    dropped = np.asarray(metrics.clients["secagg_dropped"])[:8]
    keep = [i for i in range(8) if not dropped[i]]
    assert 0 < len(keep) < 8
    norms = [np.sqrt(sum(np.sum(np.square(np.asarray(d[k]))) for k in params)) for d in deltas]
    assert 0 < sum(norms[i] > 0.4 for i in keep) < len(keep)
    assert int(metrics.server["secagg_dropped"]) == 8 - len(keep)
    for k in params:
        mean = sum(min(1.0, 0.4 / norms[i]) * np.asarray(deltas[i][k]) for i in keep) / len(keep)
        np.testing.assert_allclose(new.params[k], params[k] - mean, atol=1e-6)


def test_a_simulation_stops_loudly_on_a_round_it_cannot_unmask():
    train, _ = fs.data.synthetic(num_clients=20, seed=0)
    chain = agg.chain(agg.weight_by("uniform"),
                      sa.secagg(1.0, 8, degree=4, threshold=4, dropout=0.5))
    algo = fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.1),
                                batch_size=10, aggregator=chain)
    sim = fs.Simulation(algo, train, cohort_size=8, chunk_size=4, progress=False)
    with pytest.raises(RuntimeError, match="round 0: secure aggregation could not unmask"):
        sim.run(3)
    assert sim.history[0]["server"]["secagg_unrecoverable"] > 0  # the record is kept


def test_the_loop_warns_of_an_overflow_bound_past_1_but_not_of_float32s_rounding_at_1():
    # The default scale puts the bound just under 1: its float32 sum over a large cohort can
    # read a few 2^-24 above (W1's 1,000 clients: 1.00006), which is not an overflow.
    from fedjax_sim.simulation import _check_secure_aggregation

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_secure_aggregation({"round": 0, "server": {"secagg_overflow_bound": 1.0001}})
    with pytest.warns(UserWarning, match=r"overflow bound 1.01 > 1"):
        _check_secure_aggregation({"round": 0, "server": {"secagg_overflow_bound": 1.01}})
