"""Partial-model training (`fs.filters`, `fedopt(trainable=...)`): the mask's forms and errors,
the trained size, and rounds against full training and the plain reference."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedjax_sim as fs
from fedjax_sim import filters
from fedjax_sim.algorithms.local import Broadcast, local_training
from fedjax_sim.engine import ClientContext, Engine, client_mesh, replicate
from fedjax_sim.testing import (
    assert_trees_close,
    assert_trees_equal,
    reference_round,
    round_inputs,
)

RTOL, ATOL = 1e-5, 1e-6
LAST = "Dense_1"  # mlp(60, 10, hidden=(8,)): Dense_0 (60x8 + 8), Dense_1 (8x10 + 10)


@pytest.fixture(scope="module")
def data():
    return fs.data.synthetic(num_clients=8, max_examples_per_client=40, seed=1)[0]


@pytest.fixture(scope="module")
def model():
    return fs.models.mlp(60, 10, hidden=(8,))


@pytest.fixture(scope="module")
def params(model):
    return model.init(jax.random.key(0))


@pytest.fixture(scope="module")
def last_layer(params):
    return filters.mask(LAST, params)


# -- the mask ---------------------------------------------------------------------------------
def test_every_form_of_filter_gives_the_same_mask(params, last_layer):
    expected = {"Dense_0": {"bias": False, "kernel": False},
                "Dense_1": {"bias": True, "kernel": True}}
    assert last_layer == expected
    forms = [lambda path, _: path.startswith(LAST), {"Dense_0": False, "Dense_1": True},
             expected, ("Dense_1/kernel", "Dense_1/bias"), nnx.PathContains(LAST),
             (nnx.PathContains(LAST), "no-such-layer|Dense_1/bias")]
    for form in forms:
        assert filters.mask(form, params) == expected, form


def test_mask_errors_name_the_problem(params):
    with pytest.raises(ValueError, match="structure is not the params'"):
        filters.mask({"Dense_0": True}, params)
    with pytest.raises(ValueError, match=r"matches no parameter path.*\['Dense_0', 'Dense_1'\]"):
        filters.mask("Dense_7", params)
    with pytest.raises(ValueError, match="'Dense_7' matches no parameter path"):
        filters.mask(("Dense_0", "Dense_7"), params)
    with pytest.raises(ValueError, match="selects nothing trainable"):
        filters.mask(lambda path, leaf: leaf.ndim > 2, params)
    with pytest.raises(TypeError, match="not a Python bool"):
        filters.mask(lambda path, leaf: jnp.asarray(True), params)
    with pytest.raises(TypeError, match="leaves must be bools"):
        filters.mask({"Dense_0": 1, "Dense_1": 0}, params)


def test_nnx_filters_read_the_state_paths_and_variables():
    class TwoLayers(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(4, 3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs)

    state = nnx.split(TwoLayers(nnx.Rngs(0)))[1]
    by_name = lambda m: {"/".join(map(str, p)): v.get_value()
                         for p, v in nnx.to_flat_state(m)}
    assert by_name(filters.mask(nnx.PathContains("l2"), state)) == {
        "l1/bias": False, "l1/kernel": False, "l2/bias": True, "l2/kernel": True}
    assert by_name(filters.mask("l2/kernel", state))["l2/kernel"]
    assert sum(by_name(filters.mask(nnx.Param, state)).values()) == 4
    m = filters.mask(nnx.PathContains("l2"), state)
    trainable, frozen = filters.partition(state, m)
    assert len(jax.tree.leaves(trainable)) == 2 == len(jax.tree.leaves(frozen))
    assert_trees_equal(filters.combine(trainable, frozen), state)


def test_partition_leaves_holes_that_combine_fills(params, last_layer):
    trainable, frozen = filters.partition(params, last_layer)
    assert trainable["Dense_0"] == {"bias": None, "kernel": None}
    assert frozen["Dense_1"] == {"bias": None, "kernel": None}
    assert len(jax.tree.leaves(jax.tree.map(jnp.zeros_like, trainable))) == 2
    assert_trees_equal(filters.combine(trainable, frozen), params)


def test_trained_fraction_of_the_last_layer(model, params, last_layer):
    size = filters.trained_fraction(params, last_layer)
    assert size == filters.Trained(params=90, bytes=360, total_params=578, total_bytes=2312)
    assert size.fraction == pytest.approx(90 / 578)
    algo = fs.algorithms.fedavg(model, optax.sgd(0.1), trainable=LAST)
    assert algo.trained == size
    assert fs.algorithms.fedavg(model, optax.sgd(0.1)).trained is None


def test_a_filter_of_nothing_fails_before_anything_compiles(model, caplog):
    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles(True):
        with pytest.raises(ValueError, match="selects nothing trainable"):
            fs.algorithms.fedavg(model, optax.sgd(0.1), trainable=lambda path, _: False)
        before = [r for r in caplog.records if "XLA compilation" in r.getMessage()]
        jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(3))  # shows that compiles are seen
    assert not before
    assert any("XLA compilation" in r.getMessage() for r in caplog.records)


# -- local training on the trainable part -----------------------------------------------------
def _one_step(model, params, batch, optimizer, **kwargs):
    init, step = local_training(model, optimizer, **kwargs)
    ctx = ClientContext(jnp.int32(0), jax.random.key(1), jnp.int32(4), jnp.int32(1))
    run = jax.jit(lambda: step(init(Broadcast(params, jnp.int32(0)), ctx), batch,
                               jnp.ones(len(batch["y"]), bool)))
    return run()


def _batch(data, n):
    return {k: jnp.asarray(v[:n]) for k, v in data.features.items()}


def test_client_state_holds_the_trainable_leaves_only(model, params):
    init, _ = local_training(model, optax.adam(0.01), trainable=LAST)
    ctx = ClientContext(jnp.int32(0), jax.random.key(1), jnp.int32(4), jnp.int32(1))
    state = jax.eval_shape(init, Broadcast(params, jnp.int32(0)), ctx)
    size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    assert size(state.params) == 90
    assert size(state.opt_state) == 2 * 90 + 1  # Adam's mu, nu and count
    assert size(state.frozen) == 488  # one copy of the broadcast's, not the client's


def test_linear_term_acts_on_the_trainable_part(data, model, params):
    batch = _batch(data, 4)
    linear = lambda b, ctx: jax.tree.map(lambda p: jnp.full_like(p, 0.3), b.params)
    part = _one_step(model, params, batch, optax.sgd(0.5), linear=linear, trainable=LAST)
    full = _one_step(model, params, batch, optax.sgd(0.5), linear=linear)
    assert part.params["Dense_0"] == {"bias": None, "kernel": None}
    assert_trees_close(part.params[LAST], full.params[LAST], RTOL, ATOL)


def test_example_dp_clips_the_trainable_gradient(data, model, params):
    clip, lr = 1e-3, 1.0  # one example, no noise: the step is lr * clip along its gradient
    part = _one_step(model, params, _batch(data, 1), optax.sgd(lr), trainable=LAST,
                     example_dp=fs.algorithms.ExampleDP(clip, 0.0))
    moved = fs.algorithms.base.tree_norm(jax.tree.map(jnp.subtract, part.params[LAST],
                                                      params[LAST]))
    np.testing.assert_allclose(moved, lr * clip, rtol=1e-4)


# -- rounds -----------------------------------------------------------------------------------
def _rounds(algo, data, params, engine, num_rounds, cohort=5):
    """The server states after each round, and each round's host inputs for the reference."""
    rnd = jax.jit(lambda s, i: algo.round(s, i, (), engine=engine))
    state = replicate(algo.init(params, jax.random.key(100)), engine)
    rng, out = np.random.default_rng(7), []
    for r in range(num_rounds):
        indices = rng.choice(data.num_clients, cohort, replace=False)
        inputs, host_cohort, host_pool = round_inputs(algo, data, indices, engine=engine,
                                                      seed=3, round_num=r)
        state, _, metrics = rnd(state, inputs)
        out.append((state, metrics, host_cohort, host_pool))
    return out


def test_a_filter_of_every_leaf_is_full_training_bitwise(data, model, params):
    engine = Engine(chunk_size=2)
    kwargs = dict(batch_size=10, mu=0.1)
    full = fs.algorithms.fedavg(model, optax.adam(0.01), fs.algorithms.fedadam(0.01), **kwargs)
    every = fs.algorithms.fedavg(model, optax.adam(0.01), fs.algorithms.fedadam(0.01),
                                 trainable=lambda path, _: True, **kwargs)
    for (a, ma, _, _), (b, mb, _, _) in zip(_rounds(full, data, params, engine, 2),
                                            _rounds(every, data, params, engine, 2),
                                            strict=True):
        assert_trees_equal(b._replace(key=()), a._replace(key=()), "state")
        assert_trees_equal(mb, ma, "metrics")


CASES = [  # (id, chunk size K, devices, client optimizer, server optimizer, mu)
    ("k1-sgd-fedavg", 1, 1, lambda: optax.sgd(0.3), lambda: optax.sgd(1.0), 0.0),
    ("k3-adam-fedadam-prox", 3, 1, lambda: optax.adam(0.01), lambda: fs.algorithms.fedadam(0.01),
     0.1),
    ("k1-8dev-adam-fedavg", 1, 8, lambda: optax.adam(0.01), lambda: optax.sgd(1.0), 0.0),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_layer_matches_the_reference_and_the_rest_stays(data, model, params, last_layer,
                                                            case):
    _, chunk, devices, client_opt, server_opt, mu = case
    client_opt, server_opt = client_opt(), server_opt()
    engine = Engine(chunk_size=chunk, mesh=client_mesh() if devices == 8 else None)
    algo = fs.algorithms.fedopt(model, client_opt, server_opt, batch_size=10, mu=mu,
                                trainable=LAST)
    ref_params, ref_opt_state = params, server_opt.init(params)
    for r, (state, metrics, cohort, pool) in enumerate(_rounds(algo, data, params, engine, 3)):
        ref_params, ref_opt_state, ref = reference_round(
            model, client_opt, server_opt, ref_params, ref_opt_state, cohort, pool,
            jax.random.fold_in(jax.random.key(100), r), cohort.batch_size, round_num=r, mu=mu,
            trainable=last_layer)
        np.testing.assert_allclose(metrics.clients["train_loss"], ref["train_loss"], RTOL, ATOL)
        assert_trees_close(state.params, ref_params, RTOL, ATOL, what=f"round {r} params")
        assert_trees_close(state.opt_state, ref_opt_state, RTOL, ATOL,
                           what=f"round {r} server opt state")
    assert_trees_equal(state.params["Dense_0"], params["Dense_0"], "frozen after 3 rounds")
    assert not np.allclose(state.params[LAST]["kernel"], params[LAST]["kernel"])


def test_server_weight_decay_does_not_move_frozen_leaves(data, model, params):
    server_opt = optax.adamw(0.01, weight_decay=0.5)
    zeros = jax.tree.map(jnp.zeros_like, params)  # a zero gradient alone would move them:
    decayed, _ = server_opt.update(zeros, server_opt.init(params), params)
    assert np.any(np.asarray(decayed["Dense_0"]["kernel"]) != 0)
    algo = fs.algorithms.fedavg(model, optax.sgd(0.3), server_opt, batch_size=10,
                                trainable=LAST)
    state = _rounds(algo, data, params, Engine(chunk_size=1), 2)[-1][0]
    assert_trees_equal(state.params["Dense_0"], params["Dense_0"], "frozen")
    assert not np.allclose(state.params[LAST]["kernel"], params[LAST]["kernel"])


def test_vmapped_clients_carry_no_copy_of_the_frozen_leaves(data, model, params):
    engine = Engine(chunk_size=4)  # Dense_0's kernel per client would be f32[4,60,8]
    programs = {}
    for trainable in (None, LAST):
        algo = fs.algorithms.fedavg(model, optax.adam(0.01), batch_size=10, trainable=trainable)
        inputs, _, _ = round_inputs(algo, data, np.arange(8), engine=engine)
        programs[trainable] = str(jax.make_jaxpr(
            lambda s, i, algo=algo: algo.round(s, i, (), engine=engine))(
                algo.init(params, jax.random.key(1)), inputs))
    assert "f32[4,60,8]" in programs[None]
    assert "f32[4,60,8]" not in programs[LAST] and "f32[4,8,10]" in programs[LAST]
