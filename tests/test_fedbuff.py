"""Asynchronous FedBuff in virtual time (`fs.algorithms.fedbuff`, `fs.asynchronous`)."""

import json

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.asynchronous import AsyncSimulation, client_steps, model_bytes
from fedjax_sim.testing import assert_trees_close, assert_trees_equal

MODEL = fs.models.logistic_regression(60, 10)


@pytest.fixture(scope="module")
def data():
    train, test = fs.data.synthetic(1.0, 1.0, num_clients=24, seed=0)
    return train, test


def _equal_times(n):
    # No compute time: every client takes download + upload, so each draw arrives together.
    return fs.devices.Devices.constant(n, example_time=0.0, download_rate=1e6, upload_rate=1e6)


def test_buffer_of_the_concurrency_with_equal_times_is_fedavg(data):
    train, _ = data
    m = 6
    algo = fs.algorithms.fedbuff(MODEL, optax.sgd(0.05), optax.sgd(0.7, momentum=0.9),
                                 buffer_size=m, batch_size=10)
    res = fs.asynchronous.simulate_async(algo, train, _equal_times(train.num_clients),
                                         concurrency=m, num_aggregations=3, seed=3)
    fedavg = fs.algorithms.fedavg(MODEL, optax.sgd(0.05), optax.sgd(0.7, momentum=0.9),
                                  batch_size=10)
    ref = fs.simulate(fedavg, train, rounds=3, cohort_size=m, seed=3, chunk_size=1,
                      progress=False)
    sampler = fs.sampling.uniform(train.num_clients, m)
    for r, (a, h) in enumerate(zip(res.history, ref.history, strict=True)):
        assert a["staleness_max"] == 0 and a["server_version"] == r + 1
        assert sorted(a["clients"]["client_id"]) == sorted(
            train.client_ids[sampler.sample(3, r)].tolist())
        assert a["clients"]["client_id"] == h["clients"]["client_id"]
        assert a["train_loss"] == h["train_loss"]
    # The same cohorts, shuffles, keys and server optimizer: the same bits.
    assert_trees_equal(res.params, ref.params)


def test_fedbuff_agrees_across_chunk_sizes_and_devices(data):
    train, _ = data
    algo = fs.algorithms.fedbuff(MODEL, optax.sgd(0.05), buffer_size=16, batch_size=5)
    devices = fs.asynchronous.lognormal_devices(train.num_clients, seed=1)
    one = fs.asynchronous.simulate_async(algo, train, devices, concurrency=20,
                                         num_aggregations=4, seed=0)
    many = fs.asynchronous.simulate_async(algo, train, devices, concurrency=20,
                                          num_aggregations=4, seed=0, chunk_size=2,
                                          mesh=fs.client_mesh())
    assert max(h["staleness_max"] for h in one.history) > 0  # stale clients were in the mix
    assert [h["clients"]["client_id"] for h in one.history] == [
        h["clients"]["client_id"] for h in many.history]
    assert_trees_close(many.params, one.params, rtol=1e-5, atol=1e-6)


def _two_speeds(train, fast, slow):
    """Client 0 takes `fast` virtual seconds, client 1 `slow`, by their compute time."""
    algo = fs.algorithms.fedbuff(MODEL, optax.sgd(0.05), buffer_size=1, batch_size=10)
    steps = client_steps(algo.batching, train)
    size = model_bytes(MODEL.init(jax.random.key(0)))
    rate = 1e6
    link = 2 * size / rate
    per_example = np.array([(fast - link) / (steps[0] * 10), (slow - link) / (steps[1] * 10)])
    return fs.devices.Devices(per_example, np.full(2, rate), np.full(2, rate)), link


def test_staleness_weights_and_event_order_by_hand(data):
    train = data[0].subset([0, 1])
    devices, _ = _two_speeds(train, 1.0, 3.5)
    # M = 2, K = 1: client 0 arrives at 1, 2, 3 (from versions 0, 1, 2, staleness 0); client
    # 1, sent version 0, arrives at 3.5 into version 3: staleness 3, while client 0 trains
    # from version 3 (two versions in flight).
    runs = {}
    for kind in ("sqrt", "constant"):
        algo = fs.algorithms.fedbuff(MODEL, optax.sgd(0.05), buffer_size=1, batch_size=10,
                                     staleness=kind)
        sim = AsyncSimulation(algo, train, devices, concurrency=2, num_aggregations=4, seed=0)
        params = [sim.state.params]
        for _ in range(4):
            sim.step()
            params.append(jax.tree.map(np.asarray, sim.state.params))
        runs[kind] = (sim, params)
    sim, sqrt_params = runs["sqrt"]
    history = sim.history
    assert [h["clients"]["client_id"] for h in history] == [[train.client_ids[i]]
                                                           for i in (0, 0, 0, 1)]
    np.testing.assert_allclose([h["virtual_time"] for h in history], [1.0, 2.0, 3.0, 3.5],
                               rtol=1e-12)
    assert [h["staleness_max"] for h in history] == [0, 0, 0, 3]
    assert [h["clients"]["draw"] for h in history] == [[0], [1], [2], [0]]
    assert sim.plan.num_slots == 2  # version 0 held by client 1 beside the current one
    const_params = runs["constant"][1]
    # Before the stale arrival both runs are the same; then the stale delta (the same
    # training from version 0 with draw 0's key) enters at 1/sqrt(1 + 3) = 1/2.
    assert_trees_equal(sqrt_params[3], const_params[3])
    step_sqrt = jax.tree.map(np.subtract, sqrt_params[3], sqrt_params[4])
    step_const = jax.tree.map(np.subtract, const_params[3], const_params[4])
    assert_trees_close(step_sqrt, jax.tree.map(lambda x: x / 2, step_const), rtol=1e-5,
                       atol=1e-7)
    assert float(np.abs(jax.tree.leaves(step_const)[0]).max()) > 0


def test_a_non_finite_client_is_excluded_and_reported(data):
    train = data[0]
    features = {k: np.array(v) for k, v in train.features.items()}
    bad = 3
    start, end = train.offsets[bad], train.offsets[bad + 1]
    features["x"][start:end, 0] = 1e30  # finite data whose training overflows
    poisoned = fs.data.FederatedData(train.client_ids, features, train.offsets)
    m = train.num_clients
    # Full batches only: no client's masked batch rows read its neighbour's examples.
    algo = fs.algorithms.fedbuff(MODEL, optax.sgd(0.05), buffer_size=m, batch_size=5,
                                 drop_remainder=True)
    res = fs.asynchronous.simulate_async(algo, poisoned, _equal_times(m), concurrency=m,
                                         num_aggregations=1)
    record = res.history[0]
    assert record["num_excluded"] == 1 and record["num_included"] == m - 1
    assert record["excluded_clients"] == [train.client_ids[bad]]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(res.params))


def test_fedavg_round_times_wait_for_the_slowest(data):
    train = data[0].subset([0, 1])
    devices, _ = _two_speeds(train, 1.0, 3.5)
    algo = fs.algorithms.fedavg(MODEL, optax.sgd(0.05), batch_size=10)
    times = fs.asynchronous.fedavg_round_times(algo, train, devices, cohort_size=2, rounds=3)
    np.testing.assert_allclose(times, [3.5, 3.5, 3.5], rtol=1e-12)


@pytest.mark.parametrize("build, run, match", [
    ({"buffer_size": 0}, {}, "buffer_size"),
    ({"buffer_size": 5, "staleness": "linear"}, {}, "staleness must be one of"),
    ({"buffer_size": 9}, {"concurrency": 8}, "buffer_size 9 is larger than the concurrency 8"),
    ({"buffer_size": 4}, {"concurrency": 25}, "concurrency 25 is larger than the population"),
])
def test_bad_input_is_refused(data, build, run, match):
    train = data[0]
    with pytest.raises(ValueError, match=match):
        algo = fs.algorithms.fedbuff(MODEL, optax.sgd(0.05), **build)
        AsyncSimulation(algo, train, _equal_times(train.num_clients),
                        **{"concurrency": 8, "num_aggregations": 1, **run})


def test_devices_and_model_must_fit_the_population(data):
    algo = fs.algorithms.fedbuff(MODEL, optax.sgd(0.05), buffer_size=2)
    with pytest.raises(ValueError, match="devices profiles 3 clients but the population has 24"):
        AsyncSimulation(algo, data[0], _equal_times(3), concurrency=4, num_aggregations=1)
    wide = fs.algorithms.fedbuff(fs.models.logistic_regression(61, 10), optax.sgd(0.05),
                                 buffer_size=2)
    with pytest.raises(ValueError, match="61"):  # before anything compiles
        AsyncSimulation(wide, data[0], _equal_times(24), concurrency=4, num_aggregations=1)


def test_cli_runs_fedbuff_and_reports_fedavg_virtual_time(tmp_path, capsys):
    from fedjax_sim import cli

    code = cli.main(["run", "--algorithm", "fedbuff", "--rounds", "3", "--num-clients", "30",
                     "--concurrency", "10", "--buffer-size", "4", "--staleness", "constant",
                     "--eval-every", "0", "--no-progress", "--output-dir", str(tmp_path)])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["buffer_size"], summary["concurrency"], summary["staleness"]) == (
        4, 10, "constant")
    lines = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [x["server_version"] for x in lines] == [1, 2, 3]
    times = [x["virtual_time"] for x in lines]
    assert times == sorted(times) and summary["virtual_time"] == times[-1]
    assert 0.0 <= summary["eval"]["accuracy"]["weighted_mean"] <= 1.0
    assert "3 FedBuff aggregations (K = 4 of M = 10 in flight)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["run", "--algorithm", "fedbuff", "--concurrency", "4", "--buffer-size", "5",
                  "--num-clients", "30", "--no-progress", "--output-dir", str(tmp_path / "b")])
    assert "buffer_size 5 is larger than the concurrency 4" in capsys.readouterr().err


def test_version_slots_hold_the_version_each_client_was_sent(data):
    """Replays the plan's stack on the host: every read finds its start version, and the
    stack is no larger than the versions alive at once need."""
    train = data[0]
    algo = fs.algorithms.fedbuff(MODEL, optax.sgd(0.05), buffer_size=3, batch_size=5)
    devices = fs.asynchronous.lognormal_devices(train.num_clients, seed=2, sigma=1.5)
    durations = fs.asynchronous.client_durations(devices, algo.batching, train,
                                                 MODEL.init(jax.random.key(0)))
    plan = fs.asynchronous.plan(train.num_clients, durations, concurrency=12, buffer_size=3,
                                num_aggregations=60, seed=0)
    stack = np.full(plan.num_slots, -1)
    stack[0] = 0
    alive = []
    for j, a in enumerate(plan.aggregations):
        assert a.version == j and len(a.client_ids) == 3
        np.testing.assert_array_equal(stack[a.slots], a.start_versions)
        stack[a.new_slot] = j + 1
        later = {int(v) for b in plan.aggregations[j + 1:] for v in b.start_versions}
        alive.append(len(later & set(range(j + 2))))
    times = [a.time for a in plan.aggregations]
    assert times == sorted(times) and max(a.staleness.max() for a in plan.aggregations) > 2
    assert plan.num_slots <= max(alive) + 1


def test_a_round_per_client_packs_each_as_its_own_round(data):
    train = data[0]
    batching = fs.algorithms.fedbuff(MODEL, optax.sgd(0.05), buffer_size=1).batching
    shape = fs.data.cohort.CohortShape.for_population(train, batching, 4)
    ids, rounds = np.array([5, 2, 9, 2]), np.array([7, 1, 3, 4])
    together, rows = fs.data.cohort.pack_cohort(train, ids, batching, shape, seed=3,
                                                round_num=rounds, sort=False)
    for i, (c, r) in enumerate(zip(ids, rounds, strict=True)):
        alone, alone_rows = fs.data.cohort.pack_cohort(train, [c], batching, shape, seed=3,
                                                       round_num=int(r))
        s, n = together.start[i], together.length[i]
        np.testing.assert_array_equal(rows[together.order[s:s + n]],
                                      alone_rows[alone.order[:alone.length[0]]])


@pytest.mark.slow  # two compiles and orbax, ~11 s on the loaded 2-core machine
def test_a_checkpointed_run_resumes_with_the_same_bits(data, tmp_path):
    train = data[0]
    algo = fs.algorithms.fedbuff(MODEL, optax.sgd(0.05), optax.adam(0.01), buffer_size=3,
                                 batch_size=10)
    devices = fs.asynchronous.lognormal_devices(train.num_clients, seed=4)
    make = lambda: AsyncSimulation(algo, train, devices, concurrency=6, num_aggregations=4)
    first = make()
    assert not first.restore(tmp_path)
    first.run(2)
    first.save(tmp_path)
    whole = first.run()  # the run never stopped
    again = make()
    assert again.restore(tmp_path) and again.aggregation == 2
    resumed = again.run()
    assert [h["clients"]["client_id"] for h in resumed.history] == [
        h["clients"]["client_id"] for h in whole.history]
    assert_trees_equal(resumed.params, whole.params)
    other = AsyncSimulation(algo, train, devices, concurrency=7, num_aggregations=4)
    with pytest.raises(ValueError, match="concurrency: checkpoint 6, now 7"):
        other.restore(tmp_path)
