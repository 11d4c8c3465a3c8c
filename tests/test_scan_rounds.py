"""Many rounds in one compiled program (`Simulation(rounds_per_call=N)`) against the same run
round by round with the on-device sampler: the same params, the same records."""

import json
import math

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.testing import assert_trees_close


@pytest.fixture(scope="module")
def population():
    return fs.data.synthetic(1.0, 1.0, num_clients=30, max_examples_per_client=40, seed=1)


ALGORITHMS = {
    "fedavg": lambda: fs.algorithms.fedavg(fs.models.logistic_regression(60, 10),
                                           optax.sgd(0.05), batch_size=10),
    "scaffold": lambda: fs.algorithms.scaffold(fs.models.logistic_regression(60, 10), 0.05,
                                               batch_size=10, num_epochs=2),
}


def _assert_same(a, b, where="record"):
    """Nested records equal: floats to float tolerance (NaN equal to NaN), the rest exactly."""
    if isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            if k != "wall_time":
                _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5,
                                                                 abs_tol=1e-6), (where, a, b)
    else:
        assert a == b, (where, a, b)


def _assert_same_run(a: fs.SimulationResult, b: fs.SimulationResult):
    assert_trees_close(a.params, b.params, rtol=1e-5, atol=1e-6)
    assert [r["round"] for r in a.history] == [r["round"] for r in b.history]
    for ra, rb in zip(a.history, b.history, strict=True):
        _assert_same(ra, rb, f"round {ra['round']}")


def _runs(population, name, devices, evaluate=True, **kwargs):
    train, test = population
    mesh = None if devices == 1 else fs.client_mesh()
    common = dict(seed=3, chunk_size=1, progress=False, mesh=mesh)
    if evaluate:
        common.update(eval_data=test, eval_every=3)
    rounds = fs.Simulation(ALGORITHMS[name](), train,
                           sampler=fs.sampling.on_device(train.num_clients, 8), **common)
    scanned = fs.Simulation(ALGORITHMS[name](), train, cohort_size=8, rounds_per_call=4,
                            **common, **kwargs)
    return rounds, scanned


def test_scanned_rounds_equal_round_by_round_with_checkpoints(population, tmp_path):
    """FedAvg on one device: calls end at evaluations (every 3) and checkpoints (every 5), so
    7 rounds run as calls of 3, 2, 1 and 1 rounds of one program."""
    rounds, scanned = _runs(population, "fedavg", 1, output_dir=tmp_path, checkpoint_every=5)
    a, b = rounds.run(7), scanned.run(7)
    _assert_same_run(a, b)
    assert [("eval" in r) for r in b.history] == [False, False, True, False, False, True, True]
    assert scanned.checkpoints.rounds() == [5, 7]
    lines = [json.loads(s) for s in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == list(range(7))
    clients = [json.loads(s) for s in (tmp_path / "clients.jsonl").read_text().splitlines()]
    assert [c["round"] for c in clients] == [2, 5, 6]  # each evaluation's, through the sinks
    assert len({r["wall_time"] for r in b.history}) == 4  # one per call


@pytest.mark.slow
def test_a_resumed_scan_continues_as_round_by_round(population, tmp_path):
    rounds, scanned = _runs(population, "fedavg", 1, output_dir=tmp_path, checkpoint_every=5)
    _assert_same_run(rounds.run(7), scanned.run(7))
    train, test = population
    resumed = fs.Simulation(ALGORITHMS["fedavg"](), train, cohort_size=8, rounds_per_call=4,
                            seed=3, chunk_size=1, progress=False, eval_data=test,
                            eval_every=3, output_dir=tmp_path, resume=True)
    assert resumed.round == 7
    _assert_same_run(rounds.run(3), resumed.run(3))


@pytest.mark.parametrize("name, devices", [
    ("scaffold", 8),
    pytest.param("fedavg", 8, marks=pytest.mark.slow),
    pytest.param("scaffold", 1, marks=pytest.mark.slow),
])
def test_scanned_rounds_equal_round_by_round(population, name, devices):
    """A stateful algorithm (SCAFFOLD's control variates in the client store) and the cohort
    split over 8 devices: the scan's sampled, packed and trained rounds are the same."""
    rounds, scanned = _runs(population, name, devices, evaluate=False)
    _assert_same_run(rounds.run(5), scanned.run(5))
    if name == "scaffold":
        assert_trees_close(rounds.store.table, scanned.store.table, rtol=1e-5, atol=1e-6)


def test_a_diverged_scan_is_reported_with_its_rounds():
    """Every client's training overflows: the monitor checks each round of the call, warns
    per round and stops the run after it, naming the rounds, with the call's rounds kept."""
    rng = np.random.default_rng(0)
    clients = {f"c{i}": {"x": np.full((6, 60), 1e30, np.float32),
                         "y": rng.integers(0, 10, 6).astype(np.int32)} for i in range(4)}
    algorithm = ALGORITHMS["fedavg"]()
    with pytest.warns(UserWarning, match=r"round 1: excluded 3 client"), \
            pytest.raises(fs.DivergedError, match=r"non-finite in rounds 0-2") as info:
        fs.simulate(algorithm, fs.data.from_client_dict(clients), rounds=10, cohort_size=3,
                    rounds_per_call=5, chunk_size=1, progress=False)
    history = info.value.result.history
    assert [r["round"] for r in history] == [0, 1, 2, 3, 4]
    assert all(r["num_included"] == 0 and len(r["excluded_clients"]) == 3 for r in history)
    assert info.value.result.state.round == 5


def test_a_callback_stops_a_scanned_run_after_its_call(population):
    train, test = population
    seen = []
    sim = fs.Simulation(ALGORITHMS["fedavg"](), train, cohort_size=8, rounds_per_call=4,
                        seed=3, chunk_size=1, progress=False, eval_data=test,
                        callbacks=[lambda sim, record: seen.append(record["round"]) or
                                   record["round"] == 1])
    result = sim.run(10)
    assert seen == [0, 1, 2, 3] and len(result.history) == 4
    assert "eval" in result.history[-1] and "eval" not in result.history[0]


def test_what_a_scan_cannot_run_is_refused_before_compiling(population, monkeypatch):
    train, _ = population
    algo = ALGORITHMS["scaffold"]()

    def build(**kwargs):
        kwargs = {"cohort_size": 5, "rounds_per_call": 10, "progress": False, **kwargs}
        return fs.Simulation(algo, train, **kwargs)

    devices = fs.devices.DeviceModel(fs.devices.Devices.sample(train.num_clients, seed=0))
    dp = fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.1),
                              aggregator=fs.aggregators.chain(
                                  fs.aggregators.clip(1.0), fs.aggregators.weight_by("uniform"),
                                  fs.aggregators.dp_mean(1.0, 1.0, 5)))
    refusals = [
        (dict(devices=devices), "cannot take a device model"),
        (dict(resident=False), "cannot take resident=False"),
        (dict(client_store="host"), "cannot take client_store='host'"),
        (dict(cohort_size=None, sampler=fs.sampling.poisson(train.num_clients, 5)),
         r"the sampler poisson\(q=0.166667\) draws on the host; give cohort_size"),
        (dict(rounds_per_call=0), "rounds_per_call must be >= 1"),
    ]
    for kwargs, message in refusals:
        with pytest.raises((ValueError, TypeError), match=message):
            build(**kwargs)
    with pytest.raises(ValueError, match="cannot take target_epsilon"):
        fs.Simulation(dp, train, cohort_size=5, rounds_per_call=10, target_epsilon=2.0,
                      progress=False)
    straggling = fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.1),
                                      straggler_fraction=0.3)
    with pytest.raises(ValueError, match="straggler_fraction draws stragglers on the host"):
        fs.Simulation(straggling, train, cohort_size=5, rounds_per_call=10, progress=False)
    # What the defaults decide: a population or a store table too large for the device.
    monkeypatch.setattr(fs.simulation, "resident_limit", lambda: 0)
    with pytest.raises(ValueError, match="needs train resident on the device"):
        build()
    monkeypatch.setattr(fs.rounds, "resident_limit", lambda: 0)
    with pytest.raises(ValueError, match="needs the client store on the device"):
        build(resident=True)


@pytest.mark.slow
def test_dp_accounting_without_a_target_runs_in_a_scan(population):
    """Each record of a scanned DP-FedAvg run carries its epsilon, as round by round."""
    train, _ = population
    chain = fs.aggregators.chain(fs.aggregators.clip(1.0), fs.aggregators.weight_by("uniform"),
                                 fs.aggregators.dp_mean(1.0, 1.0, 5))
    algo = fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.1),
                                aggregator=chain)
    result = fs.simulate(algo, train, rounds=3, cohort_size=5, rounds_per_call=3,
                         chunk_size=1, progress=False)
    eps = [r["epsilon"] for r in result.history]
    assert 0 < eps[0] < eps[1] < eps[2] and result.privacy["rounds"] == 3
    assert jax.device_get(result.state.round) == 3
