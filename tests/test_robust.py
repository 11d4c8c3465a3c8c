"""Robust aggregation rules (`fs.robust`) against plain numpy implementations (float64) of
their papers' definitions, through the engine on 1 and 8 devices, with padding and a
non-finite client among the rows."""

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
from fedjax_sim.testing import round_inputs

NUM_CLIENTS, COHORT = 8, 16  # 8 padding rows (weight 0)
NAN_CLIENT = 3  # masked by mask_nonfinite: 7 clients count, an odd cohort


def population():
    rng = np.random.default_rng(1)
    sizes = [5, 9, 4, 12, 7, 6, 10, 3]
    clients = {f"c{i}": {"x": rng.normal(size=(s, 4)).astype(np.float32),
                         "y": rng.integers(0, 3, s).astype(np.int32)} for i, s in enumerate(sizes)}
    return fs.data.from_client_dict(clients)


def client_outputs():
    """Each client's fixed output (two leaves); two Byzantine clients far from the rest, one
    client's output not finite."""
    rng = np.random.default_rng(0)
    out = {"a": rng.standard_normal((NUM_CLIENTS, 5)).astype(np.float32),
           "b": rng.standard_normal((NUM_CLIENTS, 2, 3)).astype(np.float32)}
    for leaf in out.values():
        leaf[[0, 5]] = 20.0 + 3 * leaf[[0, 5]]
    out["a"][NAN_CLIENT, 2] = np.nan
    return out


RULES = {
    "median": lambda: robust.median(),
    "trimmed_mean": lambda: robust.trimmed_mean(0.3),
    "krum": lambda: robust.krum(1),
    "multi_krum": lambda: robust.multi_krum(2, m=3),
    "geometric_median": lambda: robust.geometric_median(iters=5, eps=1e-8),
    "norm_bound": lambda: robust.norm_bound(2.0),
    "centered_clipping": lambda: robust.centered_clipping(tau=3.0, iters=2),
}
# The weighted rules take example counts, the others count each client once.
WEIGHTING = {"geometric_median": "num_examples", "centered_clipping": "num_examples"}


def chain_for(name):
    pre = (robust.norm_bound(2.0),) if name == "norm_bound" else ()
    reduce = agg.mean() if name == "norm_bound" else RULES[name]()
    return agg.chain(*pre, agg.weight_by(WEIGHTING.get(name, "uniform")), reduce)


# -- plain numpy references (float64, rows flattened over all leaves) -------------------------
def np_median(x, w):
    return np.median(x[w > 0], axis=0)


def np_trimmed_mean(x, w, beta):
    kept = np.sort(x[w > 0], axis=0)
    t = math.floor(beta * len(kept))
    return kept[t:len(kept) - t].mean(axis=0)


def np_krum_order(x, w, f):
    """Counted rows (positions) from the best Krum score to the worst (Blanchard et al.:
    the sum of squared distances to the n - f - 2 nearest others)."""
    idx = np.flatnonzero(w > 0)
    y = x[idx]
    dist = ((y[:, None] - y[None]) ** 2).sum(-1)
    k = len(idx) - f - 2
    scores = [np.sort(np.delete(dist[i], i))[:k].sum() for i in range(len(idx))]
    return idx[np.argsort(scores, kind="stable")]


def np_multi_krum(x, w, f, m):
    return x[np_krum_order(x, w, f)[:m]].mean(axis=0)


def np_geometric_median(x, w, iters, eps, nu=1e-6):
    """Smoothed Weiszfeld from the weighted mean (Pillutla et al., Algorithm 2)."""
    alpha = np.where(w > 0, w, 0) / w[w > 0].sum()
    v = alpha @ x
    obj = alpha @ np.linalg.norm(x - v, axis=1)
    for _ in range(iters):
        beta = alpha / np.maximum(nu, np.linalg.norm(x - v, axis=1))
        v = beta @ x / beta.sum()
        new = alpha @ np.linalg.norm(x - v, axis=1)
        done, obj = abs(obj - new) <= eps * new, new
        if done:
            break
    return v


def np_centered_clipping(x, w, v, tau, iters):
    """v <- v + sum_i alpha_i clip_tau(x_i - v), `iters` times (Karimireddy et al.)."""
    x, w = x[w > 0], w[w > 0]
    alpha = w / w.sum()
    for _ in range(iters):
        d = x - v
        scale = np.minimum(1.0, tau / np.linalg.norm(d, axis=1))
        v = v + (alpha * scale) @ d
    return v


def np_norm_bound_mean(x, w, max_norm):
    x, w = x[w > 0], w[w > 0]
    scale = np.minimum(1.0, max_norm / np.linalg.norm(x, axis=1))
    return (w * scale) @ x / w.sum()


def flat(tree):
    return np.concatenate([np.asarray(v, np.float64).reshape(v.shape[0], -1)
                           for v in jax.tree.leaves(tree)], axis=1)


def flat_one(tree):
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(tree)])


def reference(name, x, w, state=None):
    if name == "median":
        return np_median(x, w)
    if name == "trimmed_mean":
        return np_trimmed_mean(x, w, 0.3)
    if name == "krum":
        return np_multi_krum(x, w, 1, 1)
    if name == "multi_krum":
        return np_multi_krum(x, w, 2, 3)
    if name == "geometric_median":
        return np_geometric_median(x, w, 5, 1e-8)
    if name == "norm_bound":
        return np_norm_bound_mean(x, w, 2.0)
    return np_centered_clipping(x, w, np.zeros(x.shape[1]) if state is None else state, 3.0, 2)


# -- through the engine ------------------------------------------------------------------------
_PASSES = {}


def engine_pass(kind, chunk, mesh):
    """One engine pass whose clients send `client_outputs()` (by population id), cached per
    (kind, layout): kind "rows" stacks them under `chain(weight_by("num_examples"),
    median())` (every rows rule's server part then reads the same `Reduced`: the order
    statistics and Krum look only at which weights are > 0), kind "norm_bound" is that
    rule's whole chain, streamed. Returns (run, metrics, cohort rows' x, the rows' example
    weights, the counted mask): `run(state, key) -> (value, state, metrics)` for a chain."""
    if (kind, chunk, mesh) in _PASSES:
        return _PASSES[kind, chunk, mesh]
    data = population()
    algo = fs.algorithms.fedavg(fs.models.logistic_regression(4, 3), optax.sgd(0.3),
                                batch_size=4, shuffle=False)
    engine = fs.Engine(chunk, fs.client_mesh() if mesh else None)
    inputs, cohort, _ = round_inputs(algo, data, np.arange(NUM_CLIENTS), engine=engine,
                                     cohort_size=COHORT)
    table = jax.tree.map(jnp.asarray, client_outputs())
    update = fs.ClientUpdate(
        init=lambda bcast, ctx: (), step=lambda local, batch, mask: local,
        finalize=lambda bcast, local, ctx: fs.ClientResult(output=jax.tree.map(
            lambda t: t[jnp.minimum(ctx.id, NUM_CLIENTS - 1)], table)))
    chain = (chain_for("norm_bound") if kind == "norm_bound" else
             agg.chain(agg.weight_by("num_examples"), robust.median()))
    result = jax.jit(lambda c, p, s, k: fs.engine.run_clients(
        update, c, p, (), k, engine=engine, aggregator=chain, agg_state=s))(
        inputs.cohort, inputs.pool, chain.init(jax.tree.map(lambda t: t[0], table)),
        jax.random.key(3))

    def run(rule_chain, state, key):
        return jax.jit(rule_chain.server)(result.reduced, state, key)

    # The rows in cohort order and the weights the rule sees (padding, the NaN client: 0).
    ids = np.asarray(cohort.client_ids)
    real = ids < NUM_CLIENTS
    x = np.zeros((len(ids), flat(table).shape[1]))
    x[real] = flat(table)[ids[real]]
    counted = np.asarray(cohort.weights, np.float64) * real * (ids != NAN_CLIENT)
    x[counted == 0] = 0.0
    _PASSES[kind, chunk, mesh] = run, result.metrics, x, counted * cohort.num_examples, counted
    return _PASSES[kind, chunk, mesh]


def engine_round(name, chunk, mesh):
    """The rule's server part twice on its engine pass (state carried): (values, metrics,
    rows x, the weights the rule sees)."""
    run, _, x, examples, counted = engine_pass("norm_bound" if name == "norm_bound" else "rows",
                                               chunk, mesh)
    chain = chain_for(name)
    state = chain.init(jax.tree.map(lambda t: t[0], client_outputs()))
    first, state, metrics = run(chain, state, jax.random.key(3))
    second, _, _ = run(chain, state, jax.random.key(4))
    w = examples if WEIGHTING.get(name) == "num_examples" else counted
    return (flat_one(first), flat_one(second)), metrics, x, w


LAYOUTS = [pytest.param(3, False, id="1-device-K3"), pytest.param(1, True, id="8-devices-K1")]


@pytest.mark.parametrize("chunk, mesh", LAYOUTS)
@pytest.mark.parametrize("name", list(RULES))
def test_each_rule_under_the_engine_is_its_numpy_definition(name, chunk, mesh):
    (first, second), metrics, x, w = engine_round(name, chunk, mesh)
    assert (w > 0).sum() == NUM_CLIENTS - 1 and (w == 0).sum() >= COHORT - NUM_CLIENTS + 1
    expected = reference(name, x, w)
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)
    # Centered clipping starts its second round from the first's aggregate; the others are
    # stateless and give the same value again.
    again = reference(name, x, w, state=expected) if name == "centered_clipping" else expected
    np.testing.assert_allclose(second, again, rtol=1e-5, atol=1e-5)
    if name in ("krum", "multi_krum"):
        assert float(metrics["krum_selected"]) == (1 if name == "krum" else 3)
        assert float(metrics["krum_fallback"]) == 0.0
        assert np.abs(first).max() < 10  # no Byzantine client (near 20) picked
    if name == "median":  # 7 clients count: exactly the middle client's coordinate
        np.testing.assert_array_equal(first.astype(np.float32),
                                      np_median(x, w).astype(np.float32))
        assert np.isin(first.astype(np.float32), x.astype(np.float32)).all()


# -- direct, on the server part ---------------------------------------------------------------
def server_value(stage, rows, weights, state=None):
    rows = jax.tree.map(jnp.asarray, rows)
    if state is None:
        state = stage.init(jax.tree.map(lambda r: r[0], rows))
    value, state, metrics = jax.jit(stage.server)(Reduced(rows, jnp.asarray(weights,
                                                                            jnp.float32)),
                                                  state, jax.random.key(0))
    return value, state, metrics


def random_rows(c=9, seed=2):
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((c, 6)).astype(np.float32),
            "b": rng.standard_normal((c, 2)).astype(np.float32)}


def test_even_median_is_the_mean_of_the_two_middle_values_and_trim_zero_is_the_mean():
    rows, w = random_rows(), np.array([1, 1, 0, 1, 1, 0, 1, 1, 0], np.float32)  # 6 count
    x = flat(rows)
    np.testing.assert_allclose(flat_one(server_value(robust.median(), rows, w)[0]),
                               np_median(x, w), rtol=1e-6)
    value, _, metrics = server_value(robust.trimmed_mean(0.0), rows, w)
    np.testing.assert_allclose(flat_one(value), x[w > 0].mean(0), rtol=1e-5, atol=1e-6)
    assert float(metrics["trimmed"]) == 0
    # beta n = 0.2 * 6 = 1.2: one client dropped at each end
    assert float(server_value(robust.trimmed_mean(0.2), rows, w)[2]["trimmed"]) == 1


def test_order_statistics_with_ties_signs_and_column_blocks_match_numpy():
    """Many ties (small integers), both zeros and a leaf of 2 full column blocks plus a
    remainder: the bitwise selection gives numpy's sorted values exactly."""
    rng = np.random.default_rng(5)
    rows = {"t": rng.integers(-3, 4, (11, 2 * robust._CPU_BLOCK + 22)).astype(np.float32),
            "z": np.array([[0.0], [-0.0]] * 5 + [[-0.0]], np.float32)}
    w = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1], np.float32)  # 9 count
    x = flat(rows)
    np.testing.assert_array_equal(flat_one(server_value(robust.median(), rows, w)[0]),
                                  np_median(x, w))
    for beta in (0.2, 0.4):  # 1 and 3 clients trimmed at each end
        value = server_value(robust.trimmed_mean(beta), rows, w)[0]
        np.testing.assert_allclose(flat_one(value), np_trimmed_mean(x, w, beta), rtol=1e-6,
                                   atol=1e-7)


@pytest.mark.parametrize("blocks", [1, 3, 8])
def test_krums_gram_from_the_upper_block_triangle_is_the_full_product(blocks):
    x = np.random.default_rng(3).standard_normal((20, 7)).astype(np.float32)
    np.testing.assert_allclose(jax.jit(robust._gram, static_argnums=1)(x, blocks),
                               x.astype(np.float64) @ x.T.astype(np.float64), rtol=1e-5,
                               atol=1e-5)
