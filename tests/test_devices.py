"""fs.devices: device profiles, availability, the round policy and the virtual clock."""

import csv
import math
import pickle
from typing import NamedTuple

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.devices import DeviceModel, Devices
from fedjax_sim.testing import assert_trees_equal

SIZES = [5, 9, 4, 12, 7, 6, 10, 3]  # batch 4: planned steps 2, 3, 1, 3, 2, 2, 3, 1
BATCH = 4
PARAM_BYTES = (5 * 3 + 3) * 4  # the logistic regression's kernel and bias, float32


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return fs.data.from_client_dict(
        {f"c{i}": {"x": rng.normal(size=(n, 5)).astype(np.float32),
                   "y": rng.integers(0, 3, n).astype(np.int32)} for i, n in enumerate(SIZES)})


@pytest.fixture(scope="module")
def algo():
    return fs.algorithms.fedavg(fs.models.logistic_regression(5, 3), optax.sgd(0.1),
                                batch_size=BATCH)


@pytest.fixture(scope="module")
def profiles():
    # Client c: 1 s per 4-example step times (c + 1) / 8, and links of 1-8 s per transfer.
    n = len(SIZES)
    return Devices(np.arange(1, n + 1) / (8 * BATCH), PARAM_BYTES / np.arange(1, n + 1),
                   PARAM_BYTES / np.full(n, 0.5))


def _run(algo, data, rounds=3, **kwargs):
    kwargs = dict(dict(cohort_size=4, seed=3, chunk_size=2, progress=False), **kwargs)
    return fs.simulate(algo, data, rounds=rounds, **kwargs)


@pytest.fixture(scope="module")
def plain(algo, data):
    return _run(algo, data)


def test_a_deadline_every_client_meets_changes_nothing(algo, data, profiles, plain):
    timed = _run(algo, data, devices=DeviceModel(profiles, deadline=1e6))
    assert_trees_equal(plain.params, timed.params)
    assert_trees_equal(plain.state.opt_state, timed.state.opt_state)
    for a, b in zip(plain.history, timed.history, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["clients"]["num_steps"] == \
            b["clients"]["num_steps"]
        assert b["num_late"] == b["num_dropped"] == 0
        assert b["round_time"] == max(b["clients"]["client_time"])  # the last to report
    clock = np.cumsum([r["round_time"] for r in timed.history])
    np.testing.assert_allclose([r["virtual_time"] for r in timed.history], clock)
    # The same plan on 8 devices with another K: the same clock, the same clients.
    sharded = _run(algo, data, devices=DeviceModel(profiles, deadline=1e6),
                   mesh=fs.client_mesh(), chunk_size=1)
    assert [r["virtual_time"] for r in sharded.history] == [r["virtual_time"]
                                                            for r in timed.history]
    fs.testing.assert_trees_close(sharded.params, timed.params)


def test_a_deadline_no_client_meets_keeps_the_server_state(algo, data, profiles):
    result = _run(algo, data, devices=DeviceModel(profiles, deadline=0.5))
    initial = algo.init(algo.model.init(jax.random.key(3)), jax.random.key(3))
    assert_trees_equal(result.params, initial.params)
    assert_trees_equal(result.state.opt_state, initial.opt_state)
    for r in result.history:
        assert r["num_included"] == 0 and math.isnan(r["train_loss"])
        assert r["num_late"] == 4 and r["round_time"] == 0.5  # the server waited it out
    assert [r["virtual_time"] for r in result.history] == [0.5, 1.0, 1.5]


def test_virtual_time_is_the_hand_computed_sum(algo):
    rng = np.random.default_rng(1)
    four = fs.data.from_client_dict(
        {f"c{i}": {"x": rng.normal(size=(n, 5)).astype(np.float32),
                   "y": rng.integers(0, 3, n).astype(np.int32)}
         for i, n in enumerate([5, 9, 4, 12])})  # steps 2, 3, 1, 3
    # download 1, 2, 0.5, 10 s; upload 1, 1, 3, 1 s; a step 0.4, 0.8, 0.2, 0.04 s.
    profiles = Devices(np.array([0.1, 0.2, 0.05, 0.01]),
                       PARAM_BYTES / np.array([1, 2, 0.5, 10]),
                       PARAM_BYTES / np.array([1, 1, 3, 1]))
    expected = {"c0": 1 + 2 * 0.4 + 1, "c1": 2 + 3 * 0.8 + 1, "c2": 0.5 + 0.2 + 3,
                "c3": 10 + 3 * 0.04 + 1}
    result = _run(algo, four, rounds=2, devices=DeviceModel(profiles))
    for r in result.history:
        times = dict(zip(r["clients"]["client_id"], r["clients"]["client_time"], strict=True))
        assert times == pytest.approx(expected)
    assert [r["virtual_time"] for r in result.history] == pytest.approx([11.12, 22.24])
    # A 6 s deadline drops c3 (11.12 s) and the round waits the whole deadline; with partial
    # work and 11.06 s, c3 fits one step (11 s of transfers + 0.04 s) and reports at 11.04 s.
    late = _run(algo, four, rounds=2, devices=DeviceModel(profiles, deadline=6.0))
    assert [r["virtual_time"] for r in late.history] == [6.0, 12.0]
    assert all(r["num_late"] == 1 and "c3" not in r["clients"]["client_id"]
               for r in late.history)
    part = _run(algo, four, rounds=1, devices=DeviceModel(profiles, deadline=11.06,
                                                          keep_partial=True))
    r = part.history[0]
    steps = dict(zip(r["clients"]["client_id"], r["clients"]["num_steps"], strict=True))
    assert steps == {"c0": 2, "c1": 3, "c2": 1, "c3": 1}
    assert r["num_partial"] == 1 and r["round_time"] == pytest.approx(11.04)


def test_every_pass_of_a_round_costs_its_examples(data, profiles):
    # Mime: a full-batch gradient pass over each client's n examples, then its local steps.
    mime = fs.algorithms.mime(fs.models.logistic_regression(5, 3), optax.sgd(0.1),
                              batch_size=BATCH)
    result = _run(mime, data, rounds=1, devices=DeviceModel(profiles))
    r = result.history[0]
    ids = np.array([int(c[1:]) for c in r["clients"]["client_id"]])
    n = np.array(SIZES)[ids]
    expected = (profiles.client_times(ids, r["clients"]["num_steps"], BATCH, PARAM_BYTES,
                                      PARAM_BYTES) + n * profiles.example_time[ids])
    np.testing.assert_allclose(r["clients"]["client_time"], expected)


def test_over_selection_counts_exactly_the_first_to_finish(algo, data, profiles):
    model = DeviceModel(profiles, over_selection=1.5)
    result = _run(algo, data, devices=model)
    kept_by_round = []
    for r in result.history:
        drawn, _ = model.select(4, seed=3, round_num=r["round"], clock=0.0)
        steps, _ = fs.data.cohort.planned_work(data, drawn, algo.batching, BATCH, seed=3,
                                               round_num=r["round"])
        times = profiles.client_times(drawn, steps, BATCH, PARAM_BYTES, PARAM_BYTES)
        first = drawn[np.argsort(times, kind="stable")[:4]]
        assert len(drawn) == 6 and r["num_unselected"] == 2
        assert sorted(r["clients"]["client_id"]) == sorted(data.client_ids[first].tolist())
        assert r["round_time"] == pytest.approx(np.sort(times)[3])
        kept_by_round.append(first)
    # The same bits as a plain run whose sampler picks those clients (the cohort compiled
    # for the 6 drawn).
    sampler = fs.sampling.Sampler(lambda seed, r: kept_by_round[r], 6, "first finishers")
    direct = _run(algo, data, cohort_size=None, sampler=sampler)
    assert_trees_equal(direct.params, result.params)


def test_partial_work_trains_exactly_the_steps_that_fit(algo, data):
    # Every step 1 s, transfers 1e-6 s: a 2.5 s deadline fits 2 of the 3 steps of the
    # 9-, 10- and 12-example clients, which is what max_steps=2 trains.
    profiles = Devices.constant(len(SIZES), example_time=1 / BATCH, download_rate=1e9,
                                upload_rate=1e9)
    capped = fs.algorithms.fedavg(algo.model, optax.sgd(0.1), batch_size=BATCH, max_steps=2)
    result = _run(algo, data, devices=DeviceModel(profiles, deadline=2.5, keep_partial=True))
    assert_trees_equal(result.params, _run(capped, data).params)
    for r in result.history:
        three = sum(SIZES[int(c[1:])] > 8 for c in r["clients"]["client_id"])
        assert r["num_partial"] == r["num_late"] == three
        assert max(r["clients"]["num_steps"]) <= 2 and r["num_included"] == 4
    assert sum(r["num_partial"] for r in result.history) > 0


def test_dropouts_are_seeded_per_client_and_reproducible(profiles):
    n = 2000
    model = DeviceModel(Devices.constant(n, example_time=0.01, download_rate=1e6,
                                         upload_rate=1e6), dropout=0.3)
    ids = np.arange(n)
    plan = lambda ids, r: model.plan(ids, np.ones(len(ids), np.int64), seed=1, round_num=r,
                                     start=0.0, target=len(ids), batch_size=4,
                                     download_bytes=100, upload_bytes=100)
    a = plan(ids, 0)
    assert abs(a.num_dropped / n - 0.3) < 0.04
    np.testing.assert_array_equal(a.ids, plan(ids, 0).ids)
    assert not np.array_equal(a.ids, plan(ids, 1).ids)  # a fresh draw each round
    # A client's fate does not depend on who else was drawn.
    half = plan(ids[::2], 0)
    np.testing.assert_array_equal(half.ids, np.intersect1d(a.ids, ids[::2]))


def test_availability_draws_only_available_clients(algo, data, profiles):
    avail = fs.devices.diurnal(len(SIZES), seed=2, period=20.0, fraction=0.5)
    model = DeviceModel(profiles, availability=avail, deadline=7.0)
    result = _run(algo, data, rounds=4, devices=model)
    for r in result.history:
        start = r["virtual_time"] - r["round_time"]
        ok = avail(None, start)
        assert r["num_available"] == ok.sum()
        assert all(ok[int(c[1:])] for c in r["clients"]["client_id"])
    # Too few available: the draw is all of them, padded to the compiled size.
    ids, num = model.select(4, seed=0, round_num=0, clock=0.0)
    assert num == avail(None, 0.0).sum() and len(ids) == min(num, 4)
    assert set(ids) <= set(np.flatnonzero(avail(None, 0.0)))
    big = fs.devices.diurnal(10000, seed=0, period=100.0, fraction=0.3)
    assert abs(big(None, 37.0).mean() - 0.3) < 0.02
    # Per-client fractions: each client's share of a period, sampled over one period.
    own = fs.devices.diurnal(3, seed=0, period=10.0, fraction=np.array([0.2, 0.7, 1.0]))
    share = np.mean([own(None, t) for t in np.linspace(0, 10, 2000, endpoint=False)], axis=0)
    np.testing.assert_allclose(share, [0.2, 0.7, 1.0], atol=0.01)
    with pytest.raises(ValueError, match="fraction must be in \\(0, 1\\]"):
        fs.devices.diurnal(3, fraction=np.array([0.2, 0.0, 1.0]))


def test_a_resumed_run_continues_the_virtual_clock_with_the_same_bits(algo, data, profiles,
                                                                      tmp_path):
    model = DeviceModel(profiles, deadline=6.0, keep_partial=True, dropout=0.25)
    kwargs = dict(devices=model, seed=5)
    whole = _run(algo, data, rounds=5, **kwargs)
    _run(algo, data, rounds=3, output_dir=tmp_path, **kwargs)
    resumed = _run(algo, data, rounds=5, output_dir=tmp_path, resume=True, **kwargs)
    assert_trees_equal(whole.params, resumed.params)
    assert [r["virtual_time"] for r in whole.history] == [r["virtual_time"]
                                                          for r in resumed.history]
    assert [r["num_dropped"] for r in whole.history] == [r["num_dropped"]
                                                         for r in resumed.history]
    with pytest.raises(ValueError, match="devices: checkpoint 'DeviceModel"):  # another one
        _run(algo, data, rounds=5, output_dir=tmp_path, resume=True, seed=5,
             devices=DeviceModel(profiles, deadline=7.0))
    with pytest.raises(ValueError, match="devices: checkpoint 'DeviceModel.*now None"):
        _run(algo, data, rounds=5, output_dir=tmp_path, resume=True, seed=5)


def test_uploads_are_the_trained_leaves_or_the_chains_encoded_bits(algo, data, profiles):
    def first_times(algorithm):
        sim = fs.Simulation(algorithm, data, cohort_size=4, seed=3, chunk_size=1,
                            progress=False, devices=DeviceModel(profiles))
        plan = sim.plan(0)
        return plan.ids, plan.client_time

    ids, full = first_times(algo)
    steps = np.array([SIZES[i] for i in ids]) // -BATCH * -1
    np.testing.assert_allclose(full, profiles.client_times(ids, steps, BATCH, PARAM_BYTES,
                                                           PARAM_BYTES))
    bias = fs.algorithms.fedavg(algo.model, optax.sgd(0.1), batch_size=BATCH,
                                trainable="^b$")
    _, partial = first_times(bias)  # 3 float32 biases go up, the whole model comes down
    np.testing.assert_allclose(partial, profiles.client_times(ids, steps, BATCH, PARAM_BYTES,
                                                              12))

    class TwoBits(NamedTuple):  # a compressing chain declares its upload
        upload_bits: object

    _, coded = first_times(algo._replace(aggregator=TwoBits(lambda n: 2 * n)))
    np.testing.assert_allclose(coded, profiles.client_times(ids, steps, BATCH, PARAM_BYTES,
                                                            2 * 18 / 8))


# -- profile and trace files ----------------------------------------------------------------
def _write_csv(path, rows, header=("client", "example_time_s", "download_Bps", "upload_Bps")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_a_device_csv_is_read_by_client_and_bad_ones_are_named(tmp_path):
    good = _write_csv(tmp_path / "d.csv", [(1, 0.02, 3e6, 1e6), (0, 0.01, 2e6, 5e5)])
    d = Devices.from_csv(good)
    np.testing.assert_array_equal(d.example_time, [0.01, 0.02])
    np.testing.assert_array_equal(d.upload_rate, [5e5, 1e6])
    cases = {
        "missing column\\(s\\) \\['upload_Bps'\\]": dict(
            rows=[(0, 0.01, 2e6)], header=("client", "example_time_s", "download_Bps")),
        "row 3, column 'download_Bps'.*> 0": dict(rows=[(0, 0.01, 2e6, 5e5),
                                                        (1, 0.01, -1, 5e5)]),
        "row 2, column 'example_time_s'.*finite": dict(rows=[(0, "inf", 2e6, 5e5)]),
        "row 2, column 'upload_Bps': 'fast' is not a number": dict(rows=[(0, 0.1, 2, "fast")]),
        "repeated: \\[0\\]": dict(rows=[(0, 0.1, 2, 2), (0, 0.1, 2, 2)]),
    }
    for i, (message, kwargs) in enumerate(cases.items()):
        with pytest.raises(ValueError, match=message):
            Devices.from_csv(_write_csv(tmp_path / f"bad{i}.csv", **kwargs))


def test_fedscale_traces_give_fedscale_times_and_availability(tmp_path):
    trace = {1: {"computation": 20.0, "communication": 800.0},
             2: {"computation": 50.0, "communication": 100.0}}
    path = tmp_path / "capacity.pkl"
    path.write_bytes(pickle.dumps(trace))
    d = Devices.from_fedscale(path, 5, seed=0)
    profile = np.where(d.example_time == 3 * 20.0 / 1000, 1, 2)
    assert sorted(np.bincount(profile)[1:]) == [2, 3]  # dealt in turn, cycling
    # FedScale: 3 x batch x steps x computation / 1000 + (up + down kbit) / communication.
    nbytes, batch, steps = 40000, 10, 7
    kbit = nbytes / 1024 * 8
    comp = np.array([trace[p]["computation"] for p in profile])
    link = np.array([trace[p]["communication"] for p in profile])
    np.testing.assert_allclose(d.client_times(np.arange(5), steps, batch, nbytes, nbytes),
                               3 * batch * steps * comp / 1000 + 2 * kbit / link)
    behave = {7: {"active": [0, 50], "inactive": [10, 60], "finish_time": 100}}
    (tmp_path / "behave.pkl").write_bytes(pickle.dumps(behave))
    avail = fs.devices.fedscale_availability(tmp_path / "behave.pkl", 2)
    assert [bool(avail([1], t)[0]) for t in (5, 20, 55, 70, 105, 159)] == [
        True, False, True, False, True, True]
    for bad, message in (({1: {"computation": -1, "communication": 5}}, "'computation' > 0"),
                         ({1: {"computation": 1}}, "'communication'")):
        path.write_bytes(pickle.dumps(bad))
        with pytest.raises(ValueError, match=message):
            Devices.from_fedscale(path, 3)
    (tmp_path / "b.pkl").write_bytes(pickle.dumps({1: {"active": [0]}}))
    with pytest.raises(ValueError, match="'inactive'"):
        fs.devices.fedscale_availability(tmp_path / "b.pkl", 3)


def test_bad_device_settings_are_refused_naming_the_problem(algo, data, profiles):
    for kwargs, message in (
            (dict(deadline=0), "deadline must be .* > 0"),
            (dict(deadline=-3.0), "deadline must be"),
            (dict(over_selection=0.9), "over_selection must be a number >= 1"),
            (dict(dropout=1.0), "dropout must be a probability in \\[0, 1\\)"),
            (dict(dropout=-0.1), "dropout must be"),
            (dict(keep_partial=True), "keep_partial needs a deadline"),
            (dict(availability=fs.devices.diurnal(8)), "availability needs a deadline")):
        with pytest.raises(ValueError, match=message):
            DeviceModel(profiles, **kwargs)
    with pytest.raises(ValueError, match="example_time must be finite and >= 0 .* client 1"):
        Devices(np.array([0.1, -0.1]), np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="profiles 3 clients, the training population has 8"):
        _run(algo, data, devices=DeviceModel(Devices.constant(
            3, example_time=1.0, download_rate=1.0, upload_rate=1.0)))
    with pytest.raises(ValueError, match="give cohort_size, not a sampler"):
        _run(algo, data, cohort_size=None, sampler=fs.sampling.uniform(8, 4),
             devices=DeviceModel(profiles, over_selection=1.3))
    with pytest.raises(ValueError, match="median\\) must be a finite number > 0"):
        Devices.sample(10, 0, upload_rate=0.0)


def test_sampled_profiles_have_the_documented_medians():
    d = Devices.sample(20000, seed=0)
    assert np.median(d.example_time) == pytest.approx(5e-3, rel=0.03)
    assert np.median(d.download_rate) == pytest.approx(2.5e6, rel=0.05)
    assert np.median(d.upload_rate) == pytest.approx(6.25e5, rel=0.05)
    assert np.std(np.log(d.download_rate)) == pytest.approx(1.0, rel=0.03)
    np.testing.assert_array_equal(d.example_time, Devices.sample(20000, seed=0).example_time)
