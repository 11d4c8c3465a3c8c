"""The compiled client engine against a plain reference round (`fedjax_sim.testing`).

Every case is small (a few clients, logistic regression or a small MLP) so the whole file runs
in well under two minutes on two CPU cores; conftest.py provides 8 CPU devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from fedjax_sim import aggregators, algorithms, models
from fedjax_sim.algorithms.base import RoundInputs
from fedjax_sim.algorithms.local import Broadcast
from fedjax_sim.data import Batching, CohortShape, from_client_dict, pack_cohort, synthetic
from fedjax_sim.data.cohort import resident_order
from fedjax_sim.engine import (
    ClientUpdate,
    Engine,
    client_mesh,
    place_cohort,
    replicate,
    run_clients,
)
from fedjax_sim.testing import (
    assert_trees_close,
    assert_trees_equal,
    reference_round,
    round_inputs,
)

RTOL, ATOL = 1e-5, 1e-6
NUM_FEATURES, NUM_CLASSES = 8, 4
RAGGED = (3, 17, 40, 1, 25, 9)  # very different client sizes, including a one-example client


# -- fixtures built by hand ------------------------------------------------------------------
def ragged_data(sizes=RAGGED, seed=0, num_features=NUM_FEATURES, huge_client=None):
    """Clients of the given sizes with random float32 features and int32 labels.

    `huge_client` gets a feature of 1e30: finite data whose training overflows.
    """
    rng = np.random.default_rng(seed)
    clients = {}
    for i, n in enumerate(sizes):
        x = rng.normal(size=(n, num_features)).astype(np.float32)
        if i == huge_client:
            x[:, 0] = 1e30
        clients[f"c{i}"] = {"x": x, "y": rng.integers(0, NUM_CLASSES, n).astype(np.int32)}
    return from_client_dict(clients)


class DropoutMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Dense(16)(x))
        h = nn.Dropout(0.5, deterministic=not train)(h)
        return nn.Dense(NUM_CLASSES)(h)


def make_model(name, num_features=NUM_FEATURES, num_classes=NUM_CLASSES):
    if name == "logreg":
        return models.logistic_regression(num_features, num_classes)
    if name == "mlp_dropout":
        return models.from_linen(DropoutMLP(), (num_features,), num_classes)
    raise ValueError(name)


CLIENT_OPTS = {"sgd": lambda: optax.sgd(0.1), "adam": lambda: optax.adam(0.01)}
SERVER_OPTS = {"fedavg": lambda: optax.sgd(1.0), "fedadam": lambda: algorithms.fedadam(0.01)}


def make_engine(chunk, devices, cohort_size):
    """The engine; chunk "C" means the whole padded cohort in one vmapped chunk."""
    mesh = client_mesh() if devices == 8 else None
    if chunk == "C":
        assert devices == 1
        return Engine(chunk_size=cohort_size)
    return Engine(chunk_size=chunk, mesh=mesh)


def jit_round(algo):
    """`(state, inputs, *, engine) -> (state, metrics)` of a stateless algorithm, jitted."""
    def rnd(state, inputs, *, engine):
        state, _, metrics = algo.round(state, inputs, (), engine=engine)
        return state, metrics

    return jax.jit(rnd, static_argnames=("engine",))


def init_state(algo, params, engine, key=None):
    """The initial server state, placed as the round returns it (replicated over the mesh), so
    that round 2 reuses round 1's program instead of compiling one for a new input sharding."""
    return replicate(algo.init(params, jax.random.key(0) if key is None else key), engine)


@contextlib.contextmanager
def compile_log():
    """The names of the programs XLA compiles within the block."""
    names = []

    class Handler(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Finished XLA compilation of "):
                names.append(message.split(" ")[4])

    handler, logger = Handler(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield names
    finally:
        logger.removeHandler(handler)


# -- the smallest sharded round --------------------------------------------------------------
def test_eight_devices_match_one_device():
    """The minimal multi-device check: one plain FedAvg round on 8 devices vs on 1."""
    data = ragged_data()
    model = make_model("logreg")
    algo = algorithms.fedavg(model, optax.sgd(0.1), batch_size=5)
    params = model.init(jax.random.key(0))
    results = []
    for engine in (Engine(chunk_size=1), Engine(chunk_size=1, mesh=client_mesh())):
        inputs, _, _ = round_inputs(algo, data, [0, 1, 2, 4], engine=engine)
        state, _ = jit_round(algo)(init_state(algo, params, engine), inputs, engine=engine)
        results.append(state.params)
    assert_trees_close(results[1], results[0], RTOL, ATOL)


@pytest.mark.slow  # 14 s of compiles
def test_sharded_model_with_its_own_scan_matches_one_device():
    """A model that scans with a constant initial carry (Flax's nn.RNN LSTM) under shard_map:
    the carry is not marked varying by the user's code, which must neither fail nor change
    the result."""
    import fedjax_sim as fs

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 90, (40, 12)).astype(np.int32)
    data = fs.data.from_arrays(np.repeat(np.arange(4), 10),
                               {"x": tokens[:, :-1].copy(), "y": tokens[:, 1:].copy()})
    model = fs.models.char_lstm(hidden=16)
    algo = algorithms.fedavg(model, optax.sgd(0.5), batch_size=5)
    params = model.init(jax.random.key(0))
    results = [fs.simulate(algo, data, rounds=2, cohort_size=4, params=params, chunk_size=1,
                           mesh=mesh, progress=False).params
               for mesh in (None, client_mesh())]
    assert_trees_close(results[1], results[0], RTOL, ATOL)


# -- engine vs reference ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    model: str = "logreg"
    client_opt: str = "sgd"
    server: str = "fedavg"
    batch_size: int | None = 5
    epochs: int = 1
    drop_remainder: bool = False
    max_steps: int | None = None
    max_examples: int | None = None
    chunk: int | str = 1
    devices: int = 1
    pool: str = "resident"
    cohort: int = 4  # clients sampled per round
    pad: int = 0  # extra zero-weight clients (before rounding up to the engine's multiple)
    weighting: str = "num_examples"
    data: str = "ragged"


CASES = [
    Case("k1-sgd-fedavg"),
    Case("k7-sgd-fedavg-hostpool", chunk=7, pool="host"),
    Case("kC-adam-fedadam-3epochs-padded", chunk="C", client_opt="adam", server="fedadam",
         epochs=3, pad=3),
    Case("k1-8dev-adam-fedavg-drop", devices=8, client_opt="adam", drop_remainder=True),
    Case("k7-8dev-sgd-fedadam-hostpool-2epochs", chunk=7, devices=8, server="fedadam",
         pool="host", epochs=2),
    Case("k2-8dev-adam-fedadam-3clients", chunk=2, devices=8, client_opt="adam",
         server="fedadam", cohort=3),
    Case("kC-synthetic-adam-fedadam-maxsteps", data="synthetic", chunk="C", client_opt="adam",
         server="fedadam", batch_size=16, max_steps=3, pool="host", cohort=5, pad=1),
    Case("kC-fullbatch-adam-uniform", chunk="C", client_opt="adam", batch_size=None,
         weighting="uniform", pad=2),
    Case("k7-maxexamples-2epochs-fedadam", chunk=7, server="fedadam", max_examples=10,
         epochs=2),
    Case("k1-dropout-sgd-fedavg", model="mlp_dropout"),
    Case("kC-dropout-adam-fedadam-2epochs", model="mlp_dropout", chunk="C", client_opt="adam",
         server="fedadam", epochs=2, pad=1),
    Case("k1-8dev-dropout-sgd-fedavg-hostpool", model="mlp_dropout", devices=8, pool="host"),
    Case("k7-adam-fedavg-drop", chunk=7, client_opt="adam", drop_remainder=True),
]


def case_data(case):
    if case.data == "ragged":
        return ragged_data(), NUM_FEATURES, NUM_CLASSES
    if case.data == "synthetic":
        train, _ = synthetic(num_clients=8, max_examples_per_client=60, seed=1)
        return train, 60, 10
    raise ValueError(case.data)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_round_matches_reference(case):
    data, num_features, num_classes = case_data(case)
    model = make_model(case.model, num_features, num_classes)
    client_opt, server_opt = CLIENT_OPTS[case.client_opt](), SERVER_OPTS[case.server]()
    algo = algorithms.fedopt(
        model, client_opt, server_opt, batch_size=case.batch_size, num_epochs=case.epochs,
        max_steps=case.max_steps, drop_remainder=case.drop_remainder,
        max_examples_per_client=case.max_examples, client_weighting=case.weighting)
    multiple = 1 if case.chunk == "C" else case.chunk * case.devices
    shape = CohortShape.for_population(data, algo.batching, case.cohort + case.pad, multiple)
    engine = make_engine(case.chunk, case.devices, shape.size)
    assert shape.size % engine.cohort_multiple == 0
    rnd = jit_round(algo)

    params = model.init(jax.random.key(42))
    state = init_state(algo, params, engine, jax.random.key(100))
    ref_params, ref_opt_state = params, server_opt.init(params)
    rng = np.random.default_rng(7)
    for r in range(2):  # round 2 checks that the server optimizer state carries over
        indices = rng.choice(data.num_clients, case.cohort, replace=False)
        inputs, ref_cohort, ref_pool = round_inputs(
            algo, data, indices, engine=engine, cohort_size=case.cohort + case.pad,
            resident=case.pool == "resident", seed=3, round_num=r)
        state, metrics = rnd(state, inputs, engine=engine)
        ref_params, ref_opt_state, ref = reference_round(
            model, client_opt, server_opt, ref_params, ref_opt_state, ref_cohort, ref_pool,
            jax.random.fold_in(jax.random.key(100), r), shape.batch_size, round_num=r,
            client_weighting=case.weighting)

        assert np.asarray(ref_cohort.weights)[case.cohort:].sum() == 0  # padding is padding
        np.testing.assert_array_equal(metrics.clients["num_steps"], ref["num_steps"])
        np.testing.assert_array_equal(metrics.clients["finite"], ref["finite"])
        np.testing.assert_allclose(metrics.clients["train_loss"], ref["train_loss"],
                                   rtol=RTOL, atol=ATOL)
        assert int(metrics.num_included) == int(np.sum(ref["weight"] > 0))
        assert int(metrics.num_excluded) == 0
        assert int(state.round) == r + 1
        assert_trees_close(state.params, ref_params, RTOL, ATOL, what=f"round {r} params")
        assert_trees_close(state.opt_state, ref_opt_state, RTOL, ATOL,
                           what=f"round {r} server opt state")


# -- finished clients are frozen exactly -----------------------------------------------------
def test_finished_steps_are_exact_noops():
    """Under vmap (K=C) the while loop runs to the longest client; shorter clients must keep
    their state exactly, so each client's Adam step count equals its own number of steps."""
    data = ragged_data(sizes=(1, 40, 6, 23, 2))
    model = make_model("logreg")
    client_opt = optax.adam(0.01)
    base = algorithms.optimizer_client_update(model, client_opt)

    def finalize(broadcast, state, ctx):
        result = base.finalize(broadcast, state, ctx)
        count = optax.tree_utils.tree_get(state.opt_state, "count")
        # Non-scalar per-client "metrics" come back stacked [C, ...]: the delta itself.
        return result._replace(metrics=dict(result.metrics, count=count, delta=result.output))

    update = ClientUpdate(base.init, base.step, finalize)
    batching = Batching(batch_size=4, num_epochs=2)
    shape = CohortShape.for_population(data, batching, 5 + 3)  # 3 padding clients
    engine = Engine(chunk_size=shape.size)
    cohort, rows = pack_cohort(data, np.arange(5), batching, shape, seed=0, round_num=0)
    cohort = resident_order(cohort, rows)
    params = model.init(jax.random.key(0))
    key = jax.random.key(5)
    agg = aggregators.default()

    @jax.jit
    def run(cohort, pool, key):
        return run_clients(update, cohort, pool, Broadcast(params, jnp.int32(0)),
                           jax.random.fold_in(key, 0), engine=engine, aggregator=agg,
                           agg_state=agg.init(params))

    results = run(place_cohort(cohort, engine), replicate(data.features, engine), key)
    steps = np.asarray(cohort.num_steps)
    assert len(set(steps[:5].tolist())) >= 4, steps  # genuinely different step counts
    np.testing.assert_array_equal(results.metrics["count"], steps)
    np.testing.assert_array_equal(results.metrics["num_steps"], steps)

    sgd = optax.sgd(1.0)
    _, _, ref = reference_round(model, client_opt, sgd, params, sgd.init(params), cohort,
                                data.features, key, shape.batch_size)
    for c in range(shape.size):
        assert int(optax.tree_utils.tree_get(ref["opt_state"][c], "count")) == steps[c]
        mine = jax.tree.map(lambda leaf, c=c: leaf[c], results.metrics["delta"])
        assert_trees_close(mine, ref["delta"][c], RTOL, ATOL, what=f"client {c} delta")
    # Padding clients never step: their delta is exactly zero.
    for leaf in jax.tree.leaves(results.metrics["delta"]):
        assert np.all(np.asarray(leaf)[5:] == 0)


# -- FedAvg with one full-batch step is centralized gradient descent -------------------------
@pytest.mark.parametrize("algo_name,devices", [("fedavg", 1), ("fedsgd", 1), ("fedavg", 8)])
def test_one_full_batch_step_is_centralized_gd(algo_name, devices):
    eta = 0.3
    data = ragged_data()
    # No dropout: a centralized loss draws different masks than the clients do.
    model = (models.mlp(NUM_FEATURES, NUM_CLASSES, hidden=(16,)) if devices == 8
             else make_model("logreg"))
    if algo_name == "fedavg":
        algo = algorithms.fedavg(model, optax.sgd(eta), optax.sgd(1.0), batch_size=None,
                                 max_steps=1)
    else:
        algo = algorithms.fedsgd(model, optax.sgd(eta))
    engine = Engine(chunk_size=1, mesh=client_mesh() if devices == 8 else None)
    indices = np.array([4, 0, 2, 5])
    inputs, cohort, _ = round_inputs(algo, data, indices, engine=engine)
    assert np.all(cohort.num_steps[: len(indices)] == 1)

    params = model.init(jax.random.key(1))
    state, _ = jit_round(algo)(init_state(algo, params, engine), inputs, engine=engine)

    pooled = data.subset(indices).pooled()

    def mean_loss(p):
        return jnp.mean(model.loss(p, pooled, jax.random.key(0)))

    expected = jax.tree.map(lambda p, g: p - eta * g, params, jax.grad(mean_loss)(params))
    assert_trees_close(state.params, expected, RTOL, ATOL)


# -- the cohort's layout does not matter -----------------------------------------------------
@pytest.mark.parametrize("chunk,devices,model_name", [(3, 1, "mlp_dropout"), (2, 8, "logreg")])
def test_permutation_and_padding_do_not_change_the_round(chunk, devices, model_name):
    data = ragged_data()
    model = make_model(model_name)
    algo = algorithms.fedopt(model, optax.adam(0.01), algorithms.fedadam(0.01), batch_size=4,
                             num_epochs=2)
    engine = Engine(chunk_size=chunk, mesh=client_mesh() if devices == 8 else None)
    rnd = jit_round(algo)
    state = init_state(algo, model.init(jax.random.key(0)), engine, jax.random.key(9))
    indices = np.array([1, 3, 4, 5, 2])

    def run(idx, size, client_perm=None):
        shape = CohortShape.for_population(data, algo.batching, size, engine.cohort_multiple)
        cohort, rows = pack_cohort(data, idx, algo.batching, shape, seed=0, round_num=0)
        cohort = resident_order(cohort, rows)
        if client_perm is not None:
            # Reorder the packed clients themselves (padding included): `pack_cohort` sorts
            # its input, so this is what tests that the engine ignores cohort positions.
            perm = np.random.default_rng(client_perm).permutation(shape.size)
            cohort = dataclasses.replace(cohort, **{
                f.name: getattr(cohort, f.name)[perm] for f in dataclasses.fields(cohort)
                if f.name not in ("order", "batch_size")})
        inputs = RoundInputs((place_cohort(cohort, engine),), replicate(data.features, engine),
                             data.num_clients)
        new_state, metrics = rnd(state, inputs, engine=engine)
        return new_state, metrics, shape.size

    base, base_metrics, base_size = run(indices, len(indices))
    permuted_input, _, _ = run(indices[::-1].copy(), len(indices))
    permuted, _, _ = run(indices, len(indices), client_perm=0)
    padded, padded_metrics, padded_size = run(indices, 3 * base_size, client_perm=1)
    assert padded_size > base_size
    assert_trees_close(permuted_input.params, base.params, RTOL, ATOL, what="permuted input")
    assert_trees_close(permuted.params, base.params, RTOL, ATOL, what="permuted cohort")
    assert_trees_close(padded.params, base.params, RTOL, ATOL, what="padded")
    assert_trees_close(padded.opt_state, base.opt_state, RTOL, ATOL, what="padded opt state")
    np.testing.assert_allclose(padded_metrics.train_loss, base_metrics.train_loss, rtol=RTOL)
    assert int(padded_metrics.num_included) == int(base_metrics.num_included) == len(indices)


# -- one compiled program for every round ----------------------------------------------------
@pytest.mark.parametrize("devices,pool_kind", [(1, "host"), (8, "resident")])
def test_rounds_do_not_recompile(devices, pool_kind):
    data = ragged_data(sizes=(3, 17, 40, 1, 25, 9, 60, 2))
    model = make_model("logreg")
    algo = algorithms.fedopt(model, optax.adam(0.01), algorithms.fedadam(0.01), batch_size=4,
                             num_epochs=2)
    engine = Engine(chunk_size=2, mesh=client_mesh() if devices == 8 else None)
    rnd = jit_round(algo)
    state = init_state(algo, model.init(jax.random.key(0)), engine)
    cohorts = [[0, 1, 2], [3, 7, 5], [6, 4, 1], [2, 6, 0]]  # very different client sizes
    for r, idx in enumerate(cohorts):
        inputs, _, _ = round_inputs(algo, data, idx, engine=engine,
                                    resident=pool_kind == "resident", round_num=r)
        # Counted as XLA compiles, not jit cache entries: a PRNG key carried in the state
        # adds a second fast-path entry for the same executable.
        with compile_log() as compiled:
            state, metrics = rnd(state, inputs, engine=engine)
        # Round 0 compiles (so the log does see compiles); no later round does.
        assert bool(compiled) == (r == 0), f"round {r} compiled: {compiled}"
    assert int(state.round) == len(cohorts)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


# -- determinism -----------------------------------------------------------------------------
@pytest.mark.parametrize("chunk,devices,model_name", [(3, 1, "logreg"), (1, 8, "mlp_dropout")])
def test_same_seed_is_bitwise_identical(chunk, devices, model_name):
    data = ragged_data()
    model = make_model(model_name)
    algo = algorithms.fedopt(model, optax.adam(0.01), algorithms.fedadam(0.01), batch_size=4)
    engine = Engine(chunk_size=chunk, mesh=client_mesh() if devices == 8 else None)

    def simulate():
        rnd = jit_round(algo)
        state = init_state(algo, model.init(jax.random.key(0)), engine)
        for r in range(2):
            idx = np.random.default_rng(r).choice(data.num_clients, 3, replace=False)
            inputs, _, _ = round_inputs(algo, data, idx, engine=engine, round_num=r)
            state, _ = rnd(state, inputs, engine=engine)
        return state

    first, second = simulate(), simulate()
    assert_trees_equal(first.params, second.params)
    assert_trees_equal(first.opt_state, second.opt_state)


# -- non-finite client updates are excluded --------------------------------------------------
@pytest.mark.parametrize("chunk,devices", [("C", 1), (1, 8)])
def test_nonfinite_client_is_excluded(chunk, devices):
    bad = 2
    data = ragged_data(sizes=(10, 12, 8, 9), huge_client=bad)
    model = make_model("logreg")
    client_opt, server_opt = optax.sgd(0.1), algorithms.fedadam(0.01)
    algo = algorithms.fedopt(model, client_opt, server_opt, batch_size=4, num_epochs=2)
    multiple = 1 if chunk == "C" else chunk * devices
    shape = CohortShape.for_population(data, algo.batching, 4, multiple)
    engine = make_engine(chunk, devices, shape.size)
    rnd = jit_round(algo)
    params = model.init(jax.random.key(0))
    state = init_state(algo, params, engine, jax.random.key(3))

    def run(indices):
        inputs, ref_cohort, ref_pool = round_inputs(algo, data, indices, engine=engine,
                                                    cohort_size=4, resident=False)
        return rnd(state, inputs, engine=engine), ref_cohort, ref_pool

    (new_state, metrics), ref_cohort, ref_pool = run([0, 1, 2, 3])
    ref_params, ref_opt_state, ref = reference_round(
        model, client_opt, server_opt, params, server_opt.init(params), ref_cohort, ref_pool,
        jax.random.fold_in(jax.random.key(3), 0), shape.batch_size)
    is_bad = np.asarray(ref_cohort.client_ids) == bad
    assert not ref["finite"][is_bad].any()  # the construction does overflow
    np.testing.assert_array_equal(metrics.clients["finite"], ~is_bad)
    assert int(metrics.num_excluded) == 1
    assert int(metrics.num_included) == 3
    assert np.isfinite(float(metrics.train_loss))
    for leaf in jax.tree.leaves((new_state.params, new_state.opt_state)):
        assert np.isfinite(np.asarray(leaf)).all()
    assert_trees_close(new_state.params, ref_params, RTOL, ATOL, what="vs reference")
    # The same as a round of the other three clients alone.
    (without, _), _, _ = run([0, 1, 3])
    assert_trees_close(new_state.params, without.params, RTOL, ATOL, what="vs good clients")
    assert_trees_close(new_state.opt_state, without.opt_state, RTOL, ATOL)


def test_all_clients_nonfinite_keeps_state():
    data = ragged_data(sizes=(6, 7), huge_client=0)
    data.features["x"][6:, 0] = 1e30  # the second client overflows too
    model = make_model("logreg")
    algo = algorithms.fedopt(model, optax.sgd(0.1), algorithms.fedadam(0.01), batch_size=3)
    engine = Engine(chunk_size=2)
    inputs, _, _ = round_inputs(algo, data, np.arange(2), engine=engine)
    state = init_state(algo, model.init(jax.random.key(0)), engine)
    new_state, metrics = jit_round(algo)(state, inputs, engine=engine)
    assert int(metrics.num_excluded) == 2 and int(metrics.num_included) == 0
    assert_trees_equal(new_state.params, state.params)
    assert_trees_equal(new_state.opt_state, state.opt_state)


# -- packing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("batching", [
    Batching(batch_size=4, num_epochs=3),
    Batching(batch_size=5, num_epochs=2, drop_remainder=True, max_examples_per_client=20),
    Batching(batch_size=3, max_steps=4, shuffle=False),
], ids=["3epochs", "drop-cap", "maxsteps-noshuffle"])
def test_packed_cohort_walks_each_clients_own_rows(batching):
    """Each client's run of `order` is whole epochs (permutations of its own rows) then a
    partial epoch, cut at `length`; `num_steps` fits `length`. The reference trusts this."""
    data = ragged_data()
    indices = np.array([2, 0, 4, 3])
    shape = CohortShape.for_population(data, batching, 6)
    cohort, rows = pack_cohort(data, indices, batching, shape, seed=1, round_num=2)
    cohort = resident_order(cohort, rows)
    b = shape.batch_size
    for c in range(len(indices)):
        i = int(cohort.client_ids[c])
        own = np.arange(data.offsets[i], data.offsets[i + 1])[: int(cohort.num_examples[c])]
        n, length, steps = len(own), int(cohort.length[c]), int(cohort.num_steps[c])
        walk = cohort.order[cohort.start[c]: cohort.start[c] + length]
        full_len = n * batching.num_epochs
        if batching.max_steps is not None:
            full_len = min(full_len, batching.max_steps * b)
        if batching.drop_remainder:
            assert steps == full_len // b and length == steps * b
        else:
            assert steps == -(-full_len // b) and length == full_len
        for e in range(0, length, n):
            epoch = walk[e: e + n]
            assert len(set(epoch.tolist())) == len(epoch)  # no repeats within an epoch
            assert set(epoch.tolist()) <= set(own.tolist())
            if len(epoch) == n and not batching.shuffle:
                np.testing.assert_array_equal(epoch, own)
    assert np.all(cohort.weights[len(indices):] == 0)
    assert np.all(cohort.num_steps[len(indices):] == 0)
    assert np.all(cohort.client_ids[len(indices):] >= data.num_clients)
