"""Aggregation chains against their definitions (numpy, float64), stage by stage and under the
engine."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_sim as fs
from fedjax_sim import aggregators as agg
from fedjax_sim.aggregators import UNROLLED_SUM_MAX, Reduced, sum_rows, weighted_sum_rows
from fedjax_sim.engine import ClientContext, replicate
from fedjax_sim.testing import assert_trees_close, reference_round, round_inputs


@pytest.mark.parametrize("k", [1, 2, UNROLLED_SUM_MAX, UNROLLED_SUM_MAX + 1, 33])
def test_sum_rows_is_the_sum_over_clients(k):
    x = np.random.default_rng(k).standard_normal((k, 5, 3)).astype(np.float32)
    got = sum_rows(jnp.asarray(x))
    assert got.shape == (5, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, x.astype(np.float64).sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, UNROLLED_SUM_MAX, UNROLLED_SUM_MAX + 1, 33])
def test_weighted_sum_rows_is_the_weighted_sum_over_clients(k):
    rng = np.random.default_rng(k)
    x = rng.standard_normal((k, 5, 3)).astype(np.float32)
    w = rng.uniform(0, 3, k).astype(np.float32)
    got = weighted_sum_rows(jnp.asarray(w), jnp.asarray(x))
    assert got.shape == (5, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np.tensordot(w.astype(np.float64), x, 1), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("k", [2, UNROLLED_SUM_MAX + 1])
def test_sum_rows_is_not_finite_when_an_input_is_not(k):
    # mask_nonfinite runs before the sum; the sum itself must not hide a NaN or inf.
    x = np.ones((k, 4), np.float32)
    x[1, 2], x[0, 0] = np.nan, np.inf
    got = np.asarray(sum_rows(jnp.asarray(x)))
    assert np.isnan(got[2]) and np.isinf(got[0]) and np.isfinite(got[[1, 3]]).all()


def run_chain(chain, outputs, weights, num_examples, chunks=((0, 2), (2, 6))):
    """The chain's client stage on each client, reduced over `chunks` as the engine does
    (streamed sums added chunk by chunk, or rows stacked), then its server stage."""
    state = chain.init(jax.tree.map(lambda o: o[0], outputs))
    per_client = []
    for c in range(len(weights)):
        ctx = ClientContext(jnp.int32(c), jax.random.key(c), jnp.int32(num_examples[c]),
                            jnp.int32(1))
        per_client.append(chain.client(jax.tree.map(lambda o, c=c: jnp.asarray(o[c]), outputs),
                                       jnp.float32(weights[c]), ctx, state))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_client)
    out, w, metrics = stacked
    if chain.reduction == "sum":
        parts = [Reduced(jax.tree.map(lambda o, a=a, b=b: weighted_sum_rows(w[a:b], o[a:b]), out),
                         sum_rows(w[a:b])) for a, b in chunks]
        reduced = jax.tree.map(jnp.add, *parts)
    else:
        reduced = Reduced(out, w)
    value, state, server_metrics = chain.server(reduced, state, jax.random.key(0))
    return value, state, metrics, server_metrics


def outputs_and_weights():
    rng = np.random.default_rng(0)
    outputs = {"a": rng.standard_normal((6, 4)).astype(np.float32),
               "b": rng.standard_normal((6,)).astype(np.float32)}
    return outputs, np.array([1, 1, 0, 1, 1, 1], np.float32), np.array([3, 1, 9, 4, 2, 7])


@pytest.mark.parametrize("kind", ["num_examples", "uniform"])
def test_default_chain_is_the_weighted_mean_of_finite_clients(kind):
    outputs, valid, n = outputs_and_weights()
    outputs["a"][4, 1] = np.nan  # client 4 is masked out, client 2 is padding
    value, _, metrics, server = run_chain(agg.default(kind), outputs, valid, n)
    finite = np.array([True, True, True, True, False, True])
    np.testing.assert_array_equal(metrics["finite"], finite)
    w = valid * finite * (n if kind == "num_examples" else 1)
    for name, v in outputs.items():
        expected = np.tensordot(w, np.nan_to_num(v.astype(np.float64)), 1) / w.sum()
        np.testing.assert_allclose(value[name], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(server["weight_sum"], w.sum())
    norms = np.sqrt(np.nan_to_num(outputs["a"].astype(np.float64)) ** 2 @ np.ones(4)
                    + outputs["b"].astype(np.float64) ** 2)
    np.testing.assert_allclose(np.asarray(metrics["update_norm"])[finite], norms[finite],
                               rtol=1e-5)
    assert np.isnan(np.asarray(metrics["update_norm"])[4])


def test_mean_of_no_weight_is_zero():
    outputs, _, n = outputs_and_weights()
    value, _, _, _ = run_chain(agg.default(), outputs, np.zeros(6, np.float32), n)
    np.testing.assert_array_equal(value["a"], np.zeros(4))


def test_median_is_the_coordinatewise_median_of_the_counted_rows():
    outputs, valid, n = outputs_and_weights()
    value, _, _, _ = run_chain(agg.chain(agg.median()), outputs, valid, n)
    for name, v in outputs.items():
        np.testing.assert_allclose(value[name], np.median(v[valid > 0], axis=0), rtol=1e-6)


def test_stages_before_the_reduction_decode_in_reverse_and_later_stages_follow():
    """encode x3 then x5 per client; the server divides by 5 then by 3 (reverse order), then
    a later stage adds 1: the result is the plain mean plus 1, and the order is recorded."""
    calls = []

    def scale(factor):
        def client(output, weight, ctx, state):
            return jax.tree.map(lambda o: o * factor, output), weight, {}

        def server(value, state, key):
            calls.append(factor)
            return jax.tree.map(lambda v: v / factor, value), state, {}

        return agg.stage(f"scale{factor}", client=client, server=server)

    def plus_one_and_count():
        def server(value, state, key):
            calls.append("post")
            return jax.tree.map(lambda v: v + 1, value), state + 1, {"post_calls": state + 1}

        return agg.stage("post", server=server, init=lambda template: jnp.int32(0))

    outputs, valid, n = outputs_and_weights()
    chain = agg.chain(agg.weight_by("uniform"), scale(3.0), scale(5.0), agg.mean(),
                      plus_one_and_count())
    value, state, _, server = run_chain(chain, outputs, valid, n)
    plain, _, _, _ = run_chain(agg.default("uniform"), outputs, valid, n)
    assert_trees_close(value, jax.tree.map(lambda v: v + 1, plain), rtol=1e-5, atol=1e-6)
    assert calls == [5.0, 3.0, "post"]
    assert int(state[-1]) == 1 and int(server["post_calls"]) == 1


def test_a_chain_needs_exactly_one_reduction_and_masks_nonfinite_first():
    with pytest.raises(ValueError, match=r"exactly one reduction.*got 0"):
        agg.chain(agg.weight_by("uniform"))
    with pytest.raises(ValueError, match=r"exactly one reduction.*got 2"):
        agg.chain(agg.mean(), agg.median())
    outputs, valid, n = outputs_and_weights()
    outputs["b"][0] = np.inf
    value, _, metrics, _ = run_chain(agg.chain(agg.mean()), outputs, valid, n)
    assert not bool(metrics["finite"][0]) and np.isfinite(np.asarray(value["b"]))


def population():
    rng = np.random.default_rng(1)
    sizes = [5, 9, 4, 12, 7, 6, 10, 3]
    clients = {f"c{i}": {"x": rng.normal(size=(s, 4)).astype(np.float32),
                         "y": rng.integers(0, 3, s).astype(np.int32)} for i, s in enumerate(sizes)}
    return fs.data.from_client_dict(clients)


@pytest.mark.parametrize("chunk, mesh", [(3, False), (1, True)])
def test_median_under_the_engine_is_the_median_of_the_client_updates(chunk, mesh):
    """A rows reduction sees every client's update [C, ...], gathered across devices: FedAvg
    with the median in place of the mean moves the server by the coordinate-wise median of
    the clients' updates (from the plain reference's per-client deltas)."""
    params, new, _, ref_deltas = _engine_round(agg.chain(agg.weight_by("uniform"), agg.median()),
                                               chunk, mesh)
    for k in params:
        deltas = np.stack([np.asarray(d[k]) for d in ref_deltas])
        np.testing.assert_allclose(new.params[k], params[k] - np.median(deltas, axis=0),
                                   rtol=1e-5, atol=1e-6)


def test_aggregator_state_carries_across_rounds():
    def counting():
        def server(value, state, key):
            return value, state + 1, {"rounds_seen": state + 1}

        return agg.stage("count", server=server, init=lambda template: jnp.int32(0))

    data = population()
    model = fs.models.logistic_regression(4, 3)
    algo = fs.algorithms.fedavg(model, optax.sgd(0.1), batch_size=4,
                                aggregator=agg.chain(agg.weight_by("num_examples"), agg.mean(),
                                                     counting()))
    result = fs.simulate(algo, data, rounds=3, cohort_size=4, chunk_size=2, progress=False)
    assert int(result.state.agg_state[-1]) == 3
    assert [r["server"]["rounds_seen"] for r in result.history] == [1.0, 2.0, 3.0]


def test_clip_bounds_each_clients_norm_and_reports_who_was_clipped():
    outputs = {"a": np.array([[6.0, 8.0], [0.3, 0.4]], np.float32),
               "b": np.zeros((2,), np.float32)}
    value, _, metrics, _ = run_chain(agg.chain(agg.clip(1.0), agg.weight_by("uniform"),
                                               agg.median()), outputs, np.ones(2), np.ones(2),
                                     chunks=((0, 2),))
    np.testing.assert_array_equal(metrics["clipped"], [True, False])
    np.testing.assert_allclose(metrics["update_norm"], [10.0, 0.5], rtol=1e-6)  # before clip
    # the median of the clipped rows [0.6, 0.8] and [0.3, 0.4]
    np.testing.assert_allclose(value["a"], [0.45, 0.6], rtol=1e-6)
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
        agg.clip(0.0)


def test_every_clipped_contribution_is_within_the_clip():
    """200 clients with norms from 1e-30 to 1e30 (float32's range), in bfloat16 and float32."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 7)) * 10.0 ** rng.uniform(-30, 30, (200, 1))
    stage = agg.clip(0.3)
    ctx = ClientContext(jnp.int32(0), jax.random.key(0), jnp.int32(1), jnp.int32(1))
    for dtype in (jnp.float32, jnp.bfloat16):
        out, _, m = jax.vmap(lambda o: stage.client({"a": o, "b": o[:2]}, 1.0, ctx,
                                                    stage.init(None)))(jnp.asarray(x, dtype))
        norms = np.sqrt(np.sum(np.square(np.asarray(out["a"], np.float64)), 1)
                        + np.sum(np.square(np.asarray(out["b"], np.float64)), 1))
        assert np.all(norms <= 0.3 * (1 + 1e-2 if dtype == jnp.bfloat16 else 1 + 1e-6))
        assert 0 < np.sum(m["clipped"]) < 200


def test_dp_mean_divides_by_the_expected_weight_and_adds_noise_of_the_stated_scale():
    outputs, valid, n = outputs_and_weights()
    exact, _, _, server = run_chain(agg.chain(agg.weight_by("uniform"),
                                              agg.dp_mean(0.0, 1.0, 10.0)), outputs, valid, n)
    for name, v in outputs.items():  # no noise: the sum over the expected weight
        np.testing.assert_allclose(exact[name], np.tensordot(valid, v, 1) / 10.0, rtol=1e-5,
                                   atol=1e-6)
    np.testing.assert_allclose(server["weight_sum"], valid.sum())
    z, c, w = 1.3, 0.5, 4.0
    mean = agg.chain(agg.weight_by("uniform"), agg.dp_mean(z, c, w))
    reduced = Reduced({"a": jnp.zeros((4000,)), "b": jnp.full((3,), 2.0)}, jnp.float32(4.0))
    state = mean.init({"a": jnp.zeros(4000), "b": jnp.zeros(3)})
    value, _, metrics = mean.server(reduced, state, jax.random.key(7))
    noise = np.asarray(value["a"]) * w  # the sum was 0: what is left is the noise
    assert stats.kstest(noise / (z * c), "norm").pvalue > 0.01  # Gaussian, stddev z c
    other, _, _ = mean.server(reduced, state, jax.random.key(8))  # another round's key
    assert abs(np.corrcoef(noise, np.asarray(other["a"]))[0, 1]) < 0.05  # independent
    np.testing.assert_allclose(float(metrics["noise_stddev"]), z * c / w, rtol=1e-6)
    again, _, _ = mean.server(reduced, state, jax.random.key(7))
    np.testing.assert_array_equal(value["a"], again["a"])  # the round's key decides it
    with pytest.raises(ValueError, match="weight them uniformly"):
        agg.chain(agg.weight_by("num_examples"), agg.dp_mean(1.0, 1.0, 10))
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
        agg.dp_mean(-1.0, 1.0, 10)


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_adaptive_clipping_converges_to_the_target_quantile_of_known_norms(quantile):
    """Norms uniform on [0, 2] (quantile q at 2q), 100 clients a round, the paper's noise on
    the count: the clip norm settles at the quantile; updates are clipped to it."""
    n, z = 100, 1.0
    stage = agg.adaptive_dp_mean(z, n, target_quantile=quantile, initial_clip=0.1)
    dims = 50
    ctxs = ClientContext(jnp.arange(n), jax.random.split(jax.random.key(0), n),
                         jnp.ones(n, jnp.int32), jnp.ones(n, jnp.int32), (), jnp.arange(n),
                         jnp.full(n, n))

    @jax.jit
    def one_round(clip_norm, key):
        k1, k2, k3 = jax.random.split(key, 3)
        norms = jax.random.uniform(k1, (n,), maxval=2.0)
        directions = jax.random.normal(k2, (n, dims))
        updates = directions / jnp.linalg.norm(directions, axis=1, keepdims=True) * norms[:, None]
        (out, bits), w, m = jax.vmap(stage.client, (0, 0, 0, None))(updates, jnp.ones(n), ctxs,
                                                                   clip_norm)
        reduced = Reduced((jnp.sum(out, 0), jnp.sum(bits)), jnp.sum(w))
        _, new_clip, metrics = stage.server(reduced, clip_norm, k3)
        return new_clip, jnp.max(jnp.linalg.norm(out, axis=1)), metrics["noise_stddev"]

    clip_norm, history = stage.init(None), []
    for r in range(300):
        used = clip_norm
        clip_norm, largest, noise = one_round(clip_norm, jax.random.key(r + 1))
        assert largest <= used * (1 + 1e-6)  # every client's contribution within the clip
        history.append(float(clip_norm))
    settled = np.mean(history[-100:])
    assert abs(settled / (2 * quantile) - 1) < 0.1, settled
    z_update = (z ** -2 - (2 * n / 20) ** -2) ** -0.5  # the update's share of the budget
    np.testing.assert_allclose(float(noise), z_update * float(used) / n, rtol=1e-5)
    with pytest.raises(ValueError, match="count_stddev 0.4 leaves no budget"):
        agg.adaptive_dp_mean(1.0, 8, count_stddev=0.4)
    with pytest.raises(ValueError, match="target_quantile is a quantile in"):
        agg.adaptive_dp_mean(1.0, 8, target_quantile=1.5)


def fedavg_round(chain, chunk, mesh):
    """One FedAvg round of the 8 clients of `population()` with `chain` under the engine
    (K = `chunk`, 8 devices if `mesh`): (model, params, new state, metrics, cohort, pool)."""
    data = population()
    model = fs.models.logistic_regression(4, 3)
    params = jax.tree.map(lambda p: p + 0.1, model.init(None))
    algo = fs.algorithms.fedavg(model, optax.sgd(0.3), batch_size=4, shuffle=False,
                                aggregator=chain)
    engine = fs.Engine(chunk, fs.client_mesh() if mesh else None)
    inputs, cohort, pool = round_inputs(algo, data, np.arange(8), engine=engine)
    state = replicate(algo.init(params, jax.random.key(0)), engine)
    new, _, metrics = jax.jit(lambda s, i: algo.round(s, i, (), engine=engine))(state, inputs)
    return model, params, new, metrics, cohort, pool


def _engine_round(chain, chunk, mesh):
    """`fedavg_round`'s (params, new state, metrics) and the plain reference's per-client
    deltas."""
    model, params, new, metrics, cohort, pool = fedavg_round(chain, chunk, mesh)
    sgd = optax.sgd(1.0)
    _, _, ref = reference_round(model, optax.sgd(0.3), sgd, params, sgd.init(params), cohort,
                                pool, jax.random.fold_in(jax.random.key(0), 0),
                                cohort.batch_size)
    return params, new, metrics, ref["delta"][:8]


def _dp_round(chunk, mesh, z):
    return _engine_round(agg.chain(agg.clip(0.4), agg.weight_by("uniform"),
                                   agg.dp_mean(z, 0.4, 10.0)), chunk, mesh)


@pytest.mark.parametrize("chunk, mesh", [(3, False), (1, True)])
def test_dp_fedavg_under_the_engine_moves_by_the_clipped_sum_over_the_expected_cohort(chunk,
                                                                                      mesh):
    """Noise off: the server moves by sum_c clip(delta_c) / W, from the plain reference's
    per-client deltas clipped by hand; noise on: the same noise on 1 and 8 devices."""
    params, new, metrics, deltas = _dp_round(chunk, mesh, 0.0)
    norms = [np.sqrt(sum(np.sum(np.square(np.asarray(d[k]))) for k in params)) for d in deltas]
    scales = [min(1.0, 0.4 / n) for n in norms]
    assert 0 < sum(s < 1 for s in scales) < 8  # some clients clipped, some not
    np.testing.assert_array_equal(np.asarray(metrics.clients["clipped"])[:8],
                                  [s < 1 for s in scales])
    for k in params:
        total = sum(s * np.asarray(d[k]) for s, d in zip(scales, deltas, strict=True))
        np.testing.assert_allclose(new.params[k], params[k] - total / 10.0, rtol=1e-5,
                                   atol=1e-6)
    noised = _dp_round(chunk, mesh, 1.0)[1]
    assert not np.allclose(noised.params["w"], new.params["w"])
    other = _dp_round(1, not mesh, 1.0)[1]
    for k in params:  # the noise comes from the round's key, whatever the layout
        np.testing.assert_allclose(noised.params[k], other.params[k], rtol=1e-5, atol=1e-6)
