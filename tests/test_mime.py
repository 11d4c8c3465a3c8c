"""Mime and MimeLite: two passes a round, against a plain reference and the rule by hand."""

import jax
import numpy as np
import optax
import pytest
from test_scaffold import population, quadratic_model

import fedjax_sim as fs
from fedjax_sim.engine import Engine, client_mesh, replicate
from fedjax_sim.testing import assert_trees_close, reference_mime_round, round_inputs


@pytest.mark.parametrize("svrg, chunk, devices", [(False, 1, 1), (True, 3, 1), (True, 1, 8)])
def test_mime_matches_the_reference_over_two_rounds(svrg, chunk, devices):
    data = population()
    model = fs.models.logistic_regression(5, 3)
    opt = optax.sgd(0.2, momentum=0.9)
    algo = (fs.algorithms.mime if svrg else fs.algorithms.mimelite)(model, opt, batch_size=3,
                                                                    num_epochs=2)
    engine = Engine(chunk, client_mesh() if devices == 8 else None)
    params = jax.tree.map(lambda p: p + 0.1, model.init(None))
    key = jax.random.key(5)
    state = replicate(algo.init(params, key), engine)
    rnd = jax.jit(lambda s, i: algo.round(s, i, (), engine=engine))
    ref = (params, opt.init(params))
    for r, indices in enumerate(([0, 2, 4, 5, 7], [1, 3, 6, 2, 0])):
        inputs, _, pool = round_inputs(algo, data, indices, engine=engine, round_num=r)
        grad_cohort, train_cohort = _host_cohorts(algo, data, indices, r)
        state, _, metrics = rnd(state, inputs)
        ref = reference_mime_round(model, opt, *ref, grad_cohort, train_cohort, pool,
                                   jax.random.fold_in(key, r), svrg=svrg)
        assert_trees_close(state.params, ref[0], 1e-5, 1e-6, what=f"round {r} params")
        assert_trees_close(state.extra, ref[1], 1e-5, 1e-6, what=f"round {r} optimizer state")
        assert int(metrics.num_included) == 5


def _host_cohorts(algo, data, indices, round_num):
    from fedjax_sim.data.cohort import resident_order
    from fedjax_sim.rounds import Packer

    packer = Packer(data, algo.passes, len(indices), Engine())
    cohorts, rows = packer.pack(np.asarray(indices), seed=0, round_num=round_num)
    return [resident_order(c, r) for c, r in zip(cohorts, rows, strict=True)]


def test_mimelite_follows_the_rule_by_hand():
    """One client, a = 4, x = 0, optax SGD 0.5 with momentum 0.5 (trace t = g + 0.5 t_prev,
    update -0.5 t), two full-batch steps under the frozen state.
    Round 1 (t_prev = 0): c = -4; y: 0 -> 2 -> 3; x = 3; t <- c = -4.
    Round 2 (t_prev = -4): c = -1; g = -1: t = -3, y = 4.5; g = 0.5: t = -1.5, y = 5.25."""
    data = fs.data.from_arrays(["p"], {"a": np.array([4.0], np.float32)})
    algo = fs.algorithms.mimelite(quadratic_model(), optax.sgd(0.5, momentum=0.5),
                                  batch_size=None, num_epochs=2, shuffle=False)
    run = lambda rounds: fs.simulate(algo, data, rounds=rounds, cohort_size=1, chunk_size=1,
                                     progress=False)
    first = run(1)
    assert float(first.params["w"]) == pytest.approx(3.0)
    assert float(first.state.extra[0].trace["w"]) == pytest.approx(-4.0)
    assert float(run(2).params["w"]) == pytest.approx(5.25)


def test_mime_steps_along_the_global_gradient_by_hand():
    """Two clients a = 1 and a = 3, x = 0, SGD 0.5, two full-batch steps: the correction
    -grad f_i(x) + c turns each client's gradient into grad f(y) = y - 2, so both reach
    0 -> 1 -> 1.5 (centralized gradient descent on f), and x = 1.5."""
    data = fs.data.from_arrays(["p", "q"], {"a": np.array([1.0, 3.0], np.float32)})
    algo = fs.algorithms.mime(quadratic_model(), optax.sgd(0.5), batch_size=None, num_epochs=2,
                              shuffle=False)
    result = fs.simulate(algo, data, rounds=1, cohort_size=2, chunk_size=2, progress=False)
    assert float(result.params["w"]) == pytest.approx(1.5)
    lite = fs.algorithms.mimelite(quadratic_model(), optax.sgd(0.5), batch_size=None,
                                  num_epochs=2, shuffle=False)
    # Without the correction client 1 moves 0 -> 0.5 -> 0.75, client 2 0 -> 1.5 -> 2.25.
    assert float(fs.simulate(lite, data, rounds=1, cohort_size=2, chunk_size=2,
                             progress=False).params["w"]) == pytest.approx(1.5)
