"""Sweeps (`fs.sweep`): each run of a vmapped sweep against the same run made alone by
`fs.Simulation` with its values built in as constants."""

import json

import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.testing import assert_trees_close

A = fs.aggregators
ROUNDS, COHORT, K = 3, 4, 2


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    sizes = [5, 9, 4, 12, 7, 6, 10, 3, 8, 6, 5, 11]
    clients = {f"c{i}": {"x": rng.normal(size=(n, 5)).astype(np.float32),
                         "y": rng.integers(0, 3, n).astype(np.int32)}
               for i, n in enumerate(sizes)}
    train = fs.data.from_client_dict(clients)
    return train, train


@pytest.fixture(scope="module")
def model():
    return fs.models.logistic_regression(5, 3)


def _alone(algo, train, seed, **kwargs):
    return fs.simulate(algo, train, rounds=ROUNDS, cohort_size=COHORT, seed=seed, chunk_size=K,
                       progress=False, **kwargs)


def _same_run(sweep_params, history, alone, tol=1e-5):
    assert_trees_close(sweep_params, alone.params, tol, 1e-6)
    for mine, theirs in zip(history, alone.history, strict=True):
        assert set(mine) == set(theirs)
        assert mine["clients"]["client_id"] == theirs["clients"]["client_id"]  # own cohorts
        np.testing.assert_allclose(mine["train_loss"], theirs["train_loss"], rtol=tol)
        if "eval" in theirs:
            np.testing.assert_allclose(mine["eval"]["accuracy"]["weighted_mean"],
                                       theirs["eval"]["accuracy"]["weighted_mean"], atol=1e-6)
        if "epsilon" in theirs:
            np.testing.assert_allclose(mine["epsilon"], theirs["epsilon"], rtol=1e-9)


def test_seeds_are_the_runs_made_one_at_a_time(data, model, tmp_path):
    train, test = data
    algo = fs.algorithms.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=4)
    res = fs.simulate_sweep(algo, train, rounds=ROUNDS, cohort_size=COHORT, seeds=[0, 1],
                            chunk_size=K, eval_data=test, eval_every=2, progress=False,
                            output_dir=tmp_path / "sweep")
    assert [r.name for r in res.runs] == ["seed=0", "seed=1"]
    assert res.groups == [[0, 1]]
    for i, run in enumerate(res.runs):
        _same_run(res.params[i], res.histories[i],
                  _alone(algo, train, run.seed, eval_data=test, eval_every=2))
    assert not np.allclose(res.params[0]["w"], res.params[1]["w"])
    # The sweep directory: sweep.json and one run directory per run (the shared contract).
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [e["name"] for e in sweep["runs"]] == ["seed=0", "seed=1"]
    assert sweep["seeds"] == [0, 1]
    run_dir = tmp_path / "sweep" / "seed=1"
    lines = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2] and "clients" not in lines[0]
    np.testing.assert_allclose([x["train_loss"] for x in lines],
                               [h["train_loss"] for h in res.histories[1]])
    evals = [json.loads(x) for x in (run_dir / "clients.jsonl").read_text().splitlines()]
    assert [e["round"] for e in evals] == [1, 2]  # after rounds 2 and 3 (the last)
    assert len(evals[0]["eval_clients"]["accuracy"]) == test.num_clients
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["seed"] == 1 and summary["chunk_size"] == K
    from flax import serialization
    restored = serialization.msgpack_restore((run_dir / "params.msgpack").read_bytes())
    np.testing.assert_array_equal(restored["w"], res.params[1]["w"])


@pytest.mark.parametrize("server_lr", [[0.005], pytest.param([0.02, 0.005],
                                                              marks=pytest.mark.slow)])
def test_a_grid_of_client_and_server_learning_rates(data, model, server_lr):
    train, _ = data
    injected = fs.algorithms.fedavg(
        model, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
        optax.inject_hyperparams(optax.adam)(learning_rate=0.01), batch_size=4)
    grid = {"client_lr": [0.05, 0.3], "server_lr": server_lr}
    res = fs.simulate_sweep(injected, train, rounds=ROUNDS, cohort_size=COHORT, seeds=[3],
                            grid=grid, chunk_size=K, progress=False)
    assert res.runs[0].name == f"client_lr=0.05,server_lr={server_lr[0]:g},seed=3"
    for i, run in enumerate(res.runs):
        plain = fs.algorithms.fedavg(model, optax.sgd(run.values["client_lr"]),
                                     optax.adam(run.values["server_lr"]), batch_size=4)
        _same_run(res.params[i], res.histories[i], _alone(plain, train, 3))


def test_fedprox_mu(data, model):
    train, _ = data
    prox = fs.algorithms.fedprox(model, optax.sgd(0.1), mu=1.0, batch_size=2, num_epochs=2)
    res = fs.simulate_sweep(prox, train, rounds=ROUNDS, cohort_size=COHORT, seeds=[0],
                            grid={"mu": [0.01, 3.0]}, chunk_size=K, progress=False)
    for i, mu in enumerate((0.01, 3.0)):
        other = fs.algorithms.fedprox(model, optax.sgd(0.1), mu=mu, batch_size=2, num_epochs=2)
        _same_run(res.params[i], res.histories[i], _alone(other, train, 0))


@pytest.mark.parametrize("clip_norm", [[0.05], pytest.param([0.05, 0.5],
                                                            marks=pytest.mark.slow)])
def test_dp_clip_norm_and_noise_multiplier(data, model, clip_norm):
    train, _ = data

    def dp(z, c):
        return fs.algorithms.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=4,
                                    aggregator=A.chain(A.clip(c), A.weight_by("uniform"),
                                                       A.dp_mean(z, c, COHORT)))
    grid = {"clip_norm": clip_norm, "noise_multiplier": [0.5, 2.0]}
    res = fs.simulate_sweep(dp(1.0, 0.1), train, rounds=ROUNDS, cohort_size=COHORT,
                            seeds=[1], grid=grid, chunk_size=K, progress=False, delta=1e-3)
    for i, run in enumerate(res.runs):
        z, c = run.values["noise_multiplier"], run.values["clip_norm"]
        alone = _alone(dp(z, c), train, 1, delta=1e-3)
        _same_run(res.params[i], res.histories[i], alone, tol=1e-4)
        np.testing.assert_allclose(res.histories[i][0]["server"]["noise_stddev"],
                                   z * c / COHORT, rtol=1e-6)
        assert res.privacy[i]["epsilon"] == pytest.approx(alone.privacy["epsilon"])
    assert res.histories[0][-1]["epsilon"] > res.histories[1][-1]["epsilon"]  # z 0.5 vs 2


def test_a_stateful_algorithm_keeps_a_store_per_run(data, model):
    train, _ = data
    algo = fs.algorithms.scaffold(model, 0.1, batch_size=4)
    res = fs.simulate_sweep(algo, train, rounds=ROUNDS, cohort_size=COHORT, seeds=[0, 5],
                            chunk_size=K, progress=False)
    for i, run in enumerate(res.runs):
        alone = _alone(algo, train, run.seed)
        _same_run(res.params[i], res.histories[i], alone)
        assert_trees_close(res.stores[i].table, alone.store.table, 1e-5, 1e-6)
        np.testing.assert_array_equal(res.stores[i].written, alone.store.written)


def test_a_small_memory_budget_splits_the_sweep_into_groups(data, model):
    train, _ = data
    algo = fs.algorithms.fedavg(model, optax.sgd(0.1), batch_size=4)
    kwargs = dict(rounds=ROUNDS, cohort_size=COHORT, seeds=[0, 1, 2], chunk_size=K,
                  progress=False)
    whole = fs.simulate_sweep(algo, train, devices=1, **kwargs)
    split = fs.simulate_sweep(algo, train, devices=1, memory_budget=1, **kwargs)
    padded = fs.simulate_sweep(algo, train, devices=2, **kwargs)  # 3 runs on 2 devices: 4
    assert whole.groups == [[0, 1, 2]] and split.groups == [[0], [1], [2]]
    for other in (split, padded):
        for a, b in zip(whole.params, other.params, strict=True):
            assert_trees_close(a, b, 1e-6, 1e-7)
        for a, b in zip(whole.histories, other.histories, strict=True):
            assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b])


def test_a_field_that_cannot_be_traced_is_refused_before_compiling(data, model):
    train, _ = data
    algo = fs.algorithms.fedavg(model, optax.sgd(0.1), batch_size=4)
    sweep = lambda **kw: fs.Sweep(algo, train, cohort_size=COHORT, chunk_size=K, **kw)
    with pytest.raises(ValueError, match=r"grid over 'batch_size'.*shapes or structure"
                                         r".*Traceable here: \[\]"):
        sweep(grid={"batch_size": [4, 8]})
    with pytest.raises(ValueError, match="'client_lr'.*optax.inject_hyperparams"):
        sweep(grid={"client_lr": [0.1, 0.2]})
    with pytest.raises(ValueError, match="seeds="):
        sweep(grid={"seed": [1, 2]})
    injected = fs.algorithms.fedavg(model, optax.inject_hyperparams(optax.sgd)(
        learning_rate=0.1), batch_size=4)
    with pytest.raises(ValueError, match=r"Traceable here: \['client.learning_rate', "
                                         r"'client_lr'\]"):
        fs.Sweep(injected, train, cohort_size=COHORT, chunk_size=K, grid={"mu": [0.1]})
    with pytest.raises(ValueError, match="non-empty list"):
        fs.Sweep(injected, train, cohort_size=COHORT, grid={"client_lr": []})
    with pytest.raises(ValueError, match="repeats"):
        fs.Sweep(injected, train, cohort_size=COHORT, grid={"client_lr": [0.1, 0.1]})
    with pytest.raises(ValueError, match="repeats a seed"):
        sweep(seeds=[1, 1])
    dp = fs.algorithms.fedavg(model, optax.sgd(0.1), batch_size=4, aggregator=A.chain(
        A.clip(0.1), A.weight_by("uniform"), A.dp_mean(1.0, 0.1, COHORT)))
    with pytest.raises(ValueError, match="clip_norm"):
        fs.Sweep(dp, train, cohort_size=COHORT, grid={"clip_norm": [0.0]})


def test_each_seed_evaluates_the_client_sample_its_run_alone_would(data, model):
    """A sampled evaluation is seeded by the run's seed, as `Simulation(seed=...)` seeds it."""
    train, test = data
    algo = fs.algorithms.fedavg(model, optax.sgd(0.1), batch_size=4)
    res = fs.simulate_sweep(algo, train, rounds=ROUNDS, cohort_size=COHORT, seeds=[0, 7],
                            chunk_size=K, eval_data=test, eval_every=1, eval_clients=5,
                            progress=False)
    samples = []
    for i, run in enumerate(res.runs):
        alone = _alone(algo, train, run.seed, eval_data=test, eval_every=1, eval_clients=5)
        _same_run(res.params[i], res.histories[i], alone)
        ids = [h["eval_clients"]["client_id"] for h in res.histories[i]]
        assert ids == [h["eval_clients"]["client_id"] for h in alone.history]
        samples.append(ids[0])
    assert samples[0] != samples[1]  # the two seeds draw different samples
