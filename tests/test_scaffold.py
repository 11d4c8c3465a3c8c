"""SCAFFOLD: the vectorized round against a plain reference, and the paper's rule by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import client_store
from fedjax_sim.engine import Engine, client_mesh, replicate
from fedjax_sim.rounds import RoundRunner, new_store
from fedjax_sim.testing import assert_trees_close, reference_scaffold_round

RTOL, ATOL = 1e-5, 1e-6
SIZES = (3, 17, 9, 1, 12, 6, 8, 4)


def population(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return fs.data.from_client_dict({
        f"c{i}": {"x": rng.normal(size=(n, 5)).astype(np.float32),
                  "y": rng.integers(0, 3, n).astype(np.int32)} for i, n in enumerate(sizes)})


@pytest.mark.parametrize("chunk, devices", [(1, 1), (3, 1), (1, 8)])
def test_scaffold_matches_the_reference_round_after_round(chunk, devices):
    data = population()
    model = fs.models.logistic_regression(5, 3)
    lr, server = 0.1, optax.sgd(0.7)
    algo = fs.algorithms.scaffold(model, lr, server, batch_size=4, num_epochs=2)
    engine = Engine(chunk, client_mesh() if devices == 8 else None)
    params = jax.tree.map(lambda p: p + 0.05, model.init(None))
    key = jax.random.key(3)
    state = replicate(algo.init(params, key), engine)
    store = new_store(algo, data, params, engine)
    runner = RoundRunner(algo, data, 5, engine, seed=0, pool=replicate(data.features, engine))
    ref = (params, server.init(params), jax.tree.map(jnp.zeros_like, params), {})
    rng = np.random.default_rng(1)
    for r in range(3):
        indices = rng.choice(data.num_clients, 5, replace=False)
        cohorts, rows = runner.packer.pack(indices, seed=0, round_num=r)
        inputs = runner.packer.place(cohorts, rows)
        state, store, metrics = runner(state, store, inputs)
        host = fs.testing.round_inputs(algo, data, indices, engine=Engine(), seed=0,
                                       round_num=r)
        ref = reference_scaffold_round(model, lr, server, ref[0], ref[1], ref[2], ref[3],
                                       host[1], host[2], jax.random.fold_in(key, r),
                                       host[1].batch_size, data.num_clients)
        assert_trees_close(state.params, ref[0], RTOL, ATOL, what=f"round {r} params")
        assert_trees_close(state.extra, ref[2], RTOL, ATOL, what=f"round {r} server c")
        assert int(metrics.num_included) == 5
    # Every client sampled so far holds its own c_i; the others were never written.
    ids = jnp.arange(data.num_clients)
    rows = client_store.gather(store, ids, jax.tree.map(lambda p: jnp.full_like(p, 99.0),
                                                        params))
    for cid in range(data.num_clients):
        mine = jax.tree.map(lambda t, cid=cid: t[cid], rows)
        if cid in ref[3]:
            assert_trees_close(mine, ref[3][cid], RTOL, ATOL, what=f"c_{cid}")
        else:
            assert all(np.all(np.asarray(x) == 99.0) for x in jax.tree.leaves(mine))


def quadratic_model():
    """f_i(w) = 0.5 (w - a)^2 averaged over the client's examples a (feature "a")."""
    def loss(params, batch, key):
        return 0.5 * (params["w"] - batch["a"]) ** 2

    def metrics(params, batch):
        return {"loss": loss(params, batch, None)}

    return fs.models.Model(init=lambda key: {"w": jnp.float32(0.0)}, loss=loss, metrics=metrics)


def test_scaffold_follows_the_papers_rule_on_a_case_by_hand():
    """Two clients of one example each (a = 1 and a = 3), full batch, two local SGD steps of
    lr 0.5, server SGD 1, N = 2 and both sampled.

    Round 1 (c = c_i = 0): y <- y - 0.5 (y - a): y = a/2, then 3a/4; x - y = -3a/4, so
    mean(x - y) = -1.5 and x = 1.5. c_i+ = (x - y) / (2 * 0.5) = -3a/4: c_1 = -0.75,
    c_2 = -2.25, c = mean = -1.5.
    Round 2 (x = 1.5): the correction c - c_i is -0.75 for client 1 and +0.75 for client 2,
    which is exactly -grad f_i(x) + grad f(x): each client's steps move along the global
    gradient grad f(1.5) = 1.5 - 2 = -0.5. y <- y - 0.5 (y - a + c - c_i):
    client 1: 1.5 -> 1.5 - 0.5 (0.5 - 0.75) = 1.625 -> 1.625 - 0.5 (0.625 - 0.75) = 1.6875;
    client 2: 1.5 -> 1.5 - 0.5 (-1.5 + 0.75) = 1.875 -> 1.875 - 0.5 (-1.125 + 0.75) = 2.0625.
    mean(x - y) = -0.375, x = 1.875.
    """
    data = fs.data.from_arrays(["p", "q"], {"a": np.array([1.0, 3.0], np.float32)})
    algo = fs.algorithms.scaffold(quadratic_model(), 0.5, batch_size=None, num_epochs=2,
                                  shuffle=False)
    result = fs.simulate(algo, data, rounds=1, cohort_size=2, chunk_size=1, progress=False)
    assert float(result.params["w"]) == pytest.approx(1.5)
    assert float(result.state.extra["w"]) == pytest.approx(-1.5)
    result = fs.simulate(algo, data, rounds=2, cohort_size=2, chunk_size=2, progress=False)
    assert float(result.params["w"]) == pytest.approx(1.875)


def test_scaffold_rejects_a_bad_learning_rate():
    with pytest.raises(ValueError, match="client_lr must be a finite number > 0"):
        fs.algorithms.scaffold(quadratic_model(), -0.1)


def test_a_client_whose_update_is_not_finite_writes_no_state():
    """Client 1's update (about 7.5e29) overflows the norm's float32 sum of squares, so it
    counts as diverged: excluded, its row stays unwritten, and the other client's c_i is
    written."""
    data = fs.data.from_client_dict({"c0": {"a": np.array([1.0], np.float32)},
                                     "c1": {"a": np.array([1e30], np.float32)}})
    model = quadratic_model()
    algo = fs.algorithms.scaffold(model, 0.5, batch_size=None)
    engine = Engine()
    params = model.init(None)
    state = replicate(algo.init(params, jax.random.key(0)), engine)
    store = new_store(algo, data, params, engine)
    runner = RoundRunner(algo, data, 2, engine, seed=0, pool=replicate(data.features, engine))
    state, store, metrics = runner(state, store, runner.pack(np.array([0, 1]), 0))
    assert int(metrics.num_excluded) == 1 and np.isfinite(float(state.params["w"]))
    np.testing.assert_array_equal(np.asarray(store.written)[:2], [True, False])
    assert np.isfinite(np.asarray(store.table["w"])).all()
