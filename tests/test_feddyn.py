"""FedDyn: the vectorized round against a plain reference, and the rule by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_scaffold import population, quadratic_model

import fedjax_sim as fs
from fedjax_sim import client_store
from fedjax_sim.engine import Engine, client_mesh, replicate
from fedjax_sim.rounds import RoundRunner, new_store
from fedjax_sim.testing import assert_trees_close, reference_feddyn_round, round_inputs


@pytest.mark.parametrize("chunk, devices", [(1, 1), (3, 1), (1, 8)])
def test_feddyn_matches_the_reference_round_after_round(chunk, devices):
    data = population()
    model = fs.models.logistic_regression(5, 3)
    lr, alpha = 0.1, 0.3
    algo = fs.algorithms.feddyn(model, optax.sgd(lr), alpha, batch_size=4)
    engine = Engine(chunk, client_mesh() if devices == 8 else None)
    params = jax.tree.map(lambda p: p + 0.05, model.init(None))
    key = jax.random.key(2)
    state = replicate(algo.init(params, key), engine)
    store = new_store(algo, data, params, engine)
    runner = RoundRunner(algo, data, 5, engine, seed=0, pool=replicate(data.features, engine))
    ref = (params, jax.tree.map(jnp.zeros_like, params), {})
    rng = np.random.default_rng(4)
    for r in range(3):
        indices = rng.choice(data.num_clients, 5, replace=False)
        state, store, _ = runner(state, store, runner.pack(indices, r))
        _, cohort, pool = round_inputs(algo, data, indices, engine=Engine(), round_num=r)
        ref = reference_feddyn_round(model, lr, alpha, ref[0], ref[1], ref[2], cohort, pool,
                                     jax.random.fold_in(key, r), data.num_clients)
        assert_trees_close(state.params, ref[0], 1e-5, 1e-6, what=f"round {r} params")
        assert_trees_close(state.extra, ref[1], 1e-5, 1e-6, what=f"round {r} h")
    rows = client_store.gather(store, jnp.arange(data.num_clients), params)
    for cid, g in ref[2].items():
        assert_trees_close(jax.tree.map(lambda t, cid=cid: t[cid], rows), g, 1e-5, 1e-6,
                           what=f"g_{cid}")


def test_feddyn_follows_the_rule_by_hand():
    """One client (N = 1), a = 4, x = 0, alpha = 1, SGD 0.5, two full-batch steps.
    Round 1 (g = 0): grad (w - 4) - g + (w - x): w 0 -> 2, then grad 0: w = 2; g = -2 (the
    client's gradient at w, as the paper's rule says); h = -2; x = mean(w) - h = 4, the
    optimum. Round 2 (x = 4, g = -2): w 4 -> 3 -> 3; g = -1; h = -1; x = 3 + 1 = 4 again."""
    data = fs.data.from_arrays(["p"], {"a": np.array([4.0], np.float32)})
    algo = fs.algorithms.feddyn(quadratic_model(), optax.sgd(0.5), 1.0, batch_size=None,
                                num_epochs=2, shuffle=False)
    run = lambda rounds: fs.simulate(algo, data, rounds=rounds, cohort_size=1, chunk_size=1,
                                     progress=False)
    first = run(1)
    assert float(first.params["w"]) == pytest.approx(4.0)
    assert float(first.state.extra["w"]) == pytest.approx(-2.0)
    assert float(first.store.table["w"][0]) == pytest.approx(-2.0)
    second = run(2)
    assert float(second.params["w"]) == pytest.approx(4.0)
    assert float(second.state.extra["w"]) == pytest.approx(-1.0)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf")])
def test_feddyn_rejects_a_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        fs.algorithms.feddyn(quadratic_model(), optax.sgd(0.1), alpha)
