"""The robust rules' server parts (`fs.robust`) on stacked rows, against plain numpy (float64):
the cases the engine-level tests (`test_robust.py`) do not reach: far-off clients, dropouts
below Krum's minimum, a round where nobody counts, centered clipping's history, bfloat16
rows, and the bad settings refused before anything compiles."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import aggregators as agg
from fedjax_sim import robust
from fedjax_sim.aggregators import Reduced

SHAPES = {"a": (4, 3), "b": (5,)}


def flat(tree):
    """One aggregate (shaped like the template) as a float64 vector, leaves in tree order."""
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def flat_rows(tree):
    """Stacked rows (leaves [C, ...]) as float64 [C, P]."""
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1)
                           for x in jax.tree.leaves(tree)], axis=1)


def np_multi_krum(x, f, m):
    """Blanchard et al.: the mean of the m rows whose n - f - 2 nearest others (squared L2)
    are closest in sum."""
    n = len(x)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    scores = [np.sort(np.delete(d[i], i))[:n - f - 2].sum() for i in range(n)]
    return x[np.argsort(scores, kind="stable")[:m]].mean(axis=0)


def np_centered_clipping(x, w, v, tau, iters=1):
    """Karimireddy et al.: v <- v + sum_i alpha_i clip_tau(x_i - v)."""
    alpha = w / w.sum()
    for _ in range(iters):
        d = x - v
        v = v + (alpha * np.minimum(1.0, tau / np.linalg.norm(d, axis=1))) @ d
    return v


def rows_and_weights(seed=0, cohort=11, uncounted=(2, 7), attackers=()):
    """Random rows and weights; the `uncounted` rows (weight 0) and the `attackers` hold
    values far from the rest, so a rule that counted the former or followed the latter
    would show it."""
    rng = np.random.default_rng(seed)
    rows = {k: rng.standard_normal((cohort, *s)).astype(np.float32) for k, s in SHAPES.items()}
    w = rng.uniform(0.5, 2.0, cohort).astype(np.float32)
    w[list(uncounted)] = 0.0
    for c in (*uncounted, *attackers):
        for k in rows:
            rows[k][c] = 1e3 * (1 + c)
    return rows, w


def server(stage, rows, w, state=None):
    """The stage's server part on stacked rows, jitted: (value, state, metrics)."""
    state = stage.init(jax.tree.map(lambda x: x[0], rows)) if state is None else state
    return jax.jit(stage.server)(Reduced(rows, jnp.asarray(w)), state, jax.random.key(0))


def test_the_median_of_an_odd_cohort_is_the_middle_clients_coordinate_exactly():
    rows, w = rows_and_weights(seed=3, cohort=10, uncounted=(4,))  # 9 count
    value, _, _ = server(robust.median(), rows, w)
    for k in rows:
        np.testing.assert_array_equal(np.asarray(value[k]), np.sort(rows[k][w > 0], axis=0)[4])


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.34])
def test_trimmed_mean_drops_floor_beta_n_at_each_end(beta):
    rows, w = rows_and_weights(seed=1)  # 9 count: 0, 1 and 3 trimmed at each end
    value, _, metrics = server(robust.trimmed_mean(beta), rows, w)
    x = np.sort(flat_rows(rows)[w > 0], axis=0)
    t = math.floor(beta * 9)
    np.testing.assert_allclose(flat(value), x[t:9 - t].mean(0), rtol=1e-5, atol=1e-6)
    assert float(metrics["trimmed"]) == t


def test_multi_krum_of_every_client_without_f_is_the_plain_mean():
    rows, w = rows_and_weights(seed=1)
    value, _, metrics = server(robust.multi_krum(0), rows, w)
    np.testing.assert_allclose(flat(value), flat_rows(rows)[w > 0].mean(0), rtol=1e-5,
                               atol=1e-6)
    assert float(metrics["krum_selected"]) == 9


def test_the_robust_rules_ignore_a_minority_of_far_off_clients_and_the_mean_does_not():
    """3 of 11 counted clients send 1e3-sized updates: Krum picks an honest client's update
    exactly, multi-Krum, median and trimmed mean stay within the honest range, the
    geometric median inside the honest cloud."""
    rows, w = rows_and_weights(seed=2, cohort=13, uncounted=(0, 12), attackers=(3, 5, 9))
    honest = w > 0
    honest[[3, 5, 9]] = False
    x = flat_rows(rows)
    for stage in (robust.krum(3), robust.multi_krum(3, 5), robust.median(),
                  robust.trimmed_mean(0.3)):
        value, _, metrics = server(stage, rows, w)
        v = flat(value)
        assert np.all(v <= x[honest].max(0) + 1e-6) and np.all(v >= x[honest].min(0) - 1e-6)
    value, _, metrics = server(robust.krum(3), rows, w)
    assert any(np.array_equal(flat(value), x[c]) for c in np.flatnonzero(honest))
    assert float(metrics["krum_selected"]) == 1 and float(metrics["krum_fallback"]) == 0
    gm, _, _ = server(robust.geometric_median(iters=20, eps=0), rows, w)
    center = x[honest].mean(0)
    assert np.linalg.norm(flat(gm) - center) < np.median(np.linalg.norm(x[honest] - center,
                                                                          axis=1))
    assert np.max((w / w.sum()) @ x) > 100  # the mean follows the attackers


def test_krum_with_too_few_counted_clients_falls_back_to_their_mean():
    rows, w = rows_and_weights(seed=4, uncounted=(0, 1, 2, 3, 4))  # f = 2 needs 7; 6 count
    for stage in (robust.krum(2), robust.multi_krum(2, 3)):
        value, _, metrics = server(stage, rows, w)
        np.testing.assert_allclose(flat(value), flat_rows(rows)[w > 0].mean(0), rtol=1e-5,
                                   atol=1e-6)
        assert float(metrics["krum_fallback"]) == 1 and float(metrics["krum_selected"]) == 6


def test_multi_krum_caps_m_at_the_counted_clients_minus_f():
    rows, w = rows_and_weights(seed=5, uncounted=(0, 1, 2))  # 8 count, f = 1: at most 7
    value, _, metrics = server(robust.multi_krum(1, 9), rows, w)
    np.testing.assert_allclose(flat(value), np_multi_krum(flat_rows(rows)[w > 0], 1, 7),
                               rtol=1e-5, atol=1e-6)
    assert float(metrics["krum_selected"]) == 7


RULES = [robust.median, lambda: robust.trimmed_mean(0.2), lambda: robust.krum(2),
         lambda: robust.multi_krum(2, 3), robust.geometric_median,
         lambda: robust.centered_clipping(1.5)]


def test_a_round_where_nobody_counts_aggregates_zero_and_keeps_the_history():
    rows, _ = rows_and_weights()
    w = np.zeros(11, np.float32)
    for make in RULES:
        stage = make()
        state = None
        if stage.name == "centered_clipping":
            state = jax.tree.map(lambda x: jnp.ones(x.shape[1:]), rows)
        value, new_state, _ = server(stage, rows, w, state)
        assert not np.any(flat(value)), stage.name
        if state is not None:
            np.testing.assert_array_equal(flat(new_state), 1.0)


def test_centered_clipping_starts_from_the_previous_rounds_aggregate():
    stage = robust.centered_clipping(0.8)
    rows1, w1 = rows_and_weights(seed=6)
    rows2, w2 = rows_and_weights(seed=7, uncounted=(1,))
    v1, state, _ = server(stage, rows1, w1)
    v2, state, m2 = server(stage, rows2, w2, state)
    x1, x2 = flat_rows(rows1)[w1 > 0], flat_rows(rows2)[w2 > 0]
    first = np_centered_clipping(x1, w1[w1 > 0].astype(float), 0.0, 0.8)
    second = np_centered_clipping(x2, w2[w2 > 0].astype(float), first, 0.8)
    np.testing.assert_allclose(flat(v1), first, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat(v2), second, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat(state), second, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m2["cc_clipped"]),
                               np.mean(np.linalg.norm(x2 - first, axis=1) > 0.8), rtol=1e-6)


def test_the_geometric_median_minimizes_the_weighted_distance_sum():
    """Run to convergence, the Weiszfeld point is a stationary point of sum_i a_i ||v - x_i||
    (its gradient vanishes) and beats the mean and the coordinate-wise median."""
    rows, w = rows_and_weights(seed=8, uncounted=(), attackers=(1, 4))
    value, _, metrics = server(robust.geometric_median(iters=200, eps=0.0), rows, w)
    x, a, v = flat_rows(rows), w / w.sum(), flat(value)
    objective = lambda c: a @ np.linalg.norm(x - c, axis=1)
    assert np.linalg.norm(a @ ((v - x) / np.linalg.norm(v - x, axis=1)[:, None])) < 1e-3
    assert objective(v) < min(objective(a @ x), objective(np.median(x, 0)))
    np.testing.assert_allclose(float(metrics["gm_objective"]), objective(v), rtol=1e-5)


def test_bfloat16_rows_are_accumulated_in_float32():
    rows, w = rows_and_weights(seed=9)
    rows16 = jax.tree.map(lambda r: jnp.asarray(r, jnp.bfloat16), rows)
    x = flat_rows(jax.tree.map(lambda r: np.asarray(r, np.float32), rows16))[w > 0]
    cases = [(robust.trimmed_mean(0.2), np.sort(x, 0)[1:8].mean(0)),
             (robust.multi_krum(2, 3), np_multi_krum(x, 2, 3)),
             (robust.centered_clipping(1.5), np_centered_clipping(x, w[w > 0].astype(float),
                                                                  0.0, 1.5))]
    for stage, expected in cases:
        value, _, _ = server(stage, rows16, w)
        assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(value)), stage.name
        np.testing.assert_allclose(flat(value), expected, rtol=1e-4, atol=1e-5)


def test_bad_settings_are_refused_naming_the_problem():
    for beta in (0.5, 0.7):
        with pytest.raises(ValueError, match=r"beta .* in \[0, 0.5\), got"):
            robust.trimmed_mean(beta)
    with pytest.raises(ValueError, match="beta"):
        robust.trimmed_mean(-0.1)
    with pytest.raises(ValueError, match=r"f = 3 .* n > 2f \+ 2 = 8 clients, got n = 8"):
        agg.chain(agg.weight_by("uniform"), robust.krum(3)).check(8)
    agg.chain(robust.krum(3)).check(9)
    with pytest.raises(ValueError, match=r"m = 8 must be in \[1, n - f\] = \[1, 7\]"):
        agg.chain(robust.multi_krum(2, 8)).check(9)
    with pytest.raises(ValueError, match="m must be >= 1"):
        robust.multi_krum(1, 0)
    with pytest.raises(ValueError, match="f must be >= 0"):
        robust.krum(-1)
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        robust.centered_clipping(0.0)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        robust.geometric_median(iters=0)
    assert agg.chain(robust.median()).check is None  # any cohort will do
    assert agg.median is robust.median  # the old name stays


def test_simulation_refuses_a_cohort_too_small_for_krum_before_compiling():
    rng = np.random.default_rng(0)
    data = fs.data.from_client_dict({f"c{i}": {"x": rng.normal(size=(4, 3)).astype(np.float32),
                                               "y": np.zeros(4, np.int32)} for i in range(9)})
    algo = fs.algorithms.fedavg(fs.models.logistic_regression(3, 2), optax.sgd(0.1),
                                batch_size=4, aggregator=robust.krum(2))
    with pytest.raises(ValueError, match=r"krum with f = 2 .* got n = 6"):
        fs.Simulation(algo, data, cohort_size=6, chunk_size=1, progress=False)
    with pytest.raises(ValueError, match=r"got n = 5"):
        fs.Simulation(algo, data, sampler=fs.sampling.uniform(9, 5), chunk_size=1,
                      progress=False)
