"""Sinks: each one's files read back to the records; resumed runs hold each round once."""

import csv
import json
import struct
import sys
import types

import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import sinks


@pytest.fixture(scope="module")
def population():
    return fs.data.synthetic(1.0, 1.0, num_clients=12, max_examples_per_client=40, seed=1)


def _algo():
    return fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.05),
                                batch_size=10)


def _kwargs(test, **more):
    return dict(cohort_size=4, chunk_size=2, eval_data=test, eval_every=2, eval_clients=6,
                progress=False, **more)


@pytest.fixture(scope="module")
def run(population, tmp_path_factory):
    """4 rounds, evaluated after rounds 1 and 3 (global and fine-tuned), into three sinks."""
    train, test = population
    out = tmp_path_factory.mktemp("run")
    result = fs.simulate(_algo(), train, rounds=4, output_dir=out,
                         sinks=("jsonl", "csv", "tensorboard"),
                         **_kwargs(test, fine_tune=fs.evaluation.FineTune(optax.sgd(0.05), 2)))
    return out, result.history


def _json(x):
    return json.loads(json.dumps(x))  # what a JSON file gives back (tuples as lists)


def read_events(logdir):
    """Every event file's scalars {tag: [(step, value)]} and histograms {tag: [(step,
    HistogramProto)]}, each record's length and data CRCs checked (TFRecord framing)."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto import event_pb2

    def masked(data):
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    scalars, histograms = {}, {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            header = data[i:i + 8]
            (n,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked(header)
            body = data[i + 12:i + 12 + n]
            assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == masked(body)
            i += 16 + n
            event = event_pb2.Event.FromString(body)
            for v in event.summary.value:
                if v.HasField("histo"):
                    histograms.setdefault(v.tag, []).append((event.step, v.histo))
                else:
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars, histograms


def test_jsonl_writes_each_round_and_each_evaluations_clients(run):
    out, history = run
    lines = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert lines == [_json({k: v for k, v in r.items()
                            if k not in ("clients", "eval_clients", "eval_personal_clients")})
                     for r in history]
    clients = [json.loads(x) for x in (out / "clients.jsonl").read_text().splitlines()]
    assert [c["round"] for c in clients] == [1, 3]
    for c in clients:
        record = history[c["round"]]
        assert c["eval_clients"] == _json(record["eval_clients"])
        assert c["eval_personal_clients"] == _json(record["eval_personal_clients"])
        assert len(c["eval_clients"]["accuracy"]) == 6
        # The per-client values are the ones the record's summary was made of.
        acc = np.asarray(c["eval_clients"]["accuracy"])
        assert record["eval"]["accuracy"]["mean"] == pytest.approx(acc.mean())


def _typed(cell, like):
    if isinstance(like, (list, dict)):
        return json.loads(cell)
    if isinstance(like, bool):
        return cell == "True"
    if isinstance(like, (int, float)):
        return type(like)(float(cell)) if isinstance(like, float) else int(cell)
    return cell


def test_csv_parses_back_to_the_records(run):
    out, history = run
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(history)
    for row, record in zip(rows, history, strict=True):
        flat = sinks.flatten(sinks.history_line(record))
        assert {k for k, v in row.items() if v != ""} == set(flat)  # the rest: not evaluated
        for k, v in flat.items():
            got = _typed(row[k], v)
            assert got == _json(v) or (isinstance(v, float) and np.isnan(v) and np.isnan(got))
    assert rows[0]["eval.accuracy.p50"] == "" and rows[1]["eval.accuracy.p50"] != ""

    with open(out / "clients.csv", newline="") as f:
        client_rows = list(csv.DictReader(f))
    assert set(client_rows[0]) == {"round", "evaluation", "client_id", "num_examples",
                                   "accuracy", "loss"}
    for r in (1, 3):
        for evaluation in ("eval_clients", "eval_personal_clients"):
            mine = [x for x in client_rows if x["round"] == str(r)
                    and x["evaluation"] == evaluation]
            expect = history[r][evaluation]
            assert [x["client_id"] for x in mine] == expect["client_id"]
            assert [float(x["accuracy"]) for x in mine] == expect["accuracy"]
            assert [float(x["loss"]) for x in mine] == expect["loss"]


def test_tensorboard_holds_every_scalar_and_each_evaluations_histograms(run):
    out, history = run
    scalars, histograms = read_events(out / "tensorboard")
    for record in history:
        for name, value in sinks.scalars(record).items():
            logged = [v for s, v in scalars[name.replace(".", "/")] if s == record["round"]]
            assert logged == [pytest.approx(value, rel=1e-6, abs=1e-30)], name
    assert [s for s, _ in scalars["train_loss"]] == [0, 1, 2, 3]
    assert [s for s, _ in scalars["eval/accuracy/weighted_mean"]] == [1, 3]
    assert "round" not in scalars  # the step itself
    for tag in ("eval_clients/accuracy", "eval_clients/loss", "eval_personal_clients/loss"):
        evaluation, metric = tag.split("/")
        assert [s for s, _ in histograms[tag]] == [1, 3]
        for step, h in histograms[tag]:
            values = np.asarray(history[step][evaluation][metric])
            assert h.num == values.size and sum(h.bucket) == values.size
            assert h.min == pytest.approx(values.min()) and h.max == pytest.approx(values.max())
            assert h.sum == pytest.approx(values.sum())
            assert h.sum_squares == pytest.approx((values ** 2).sum())


class FakeWandb(types.ModuleType):
    """A stand-in `wandb` (no network): runs keyed by id; a resumed run's step is one past
    its last logged one, and a log below it is dropped, as W&B does."""

    def __init__(self):
        super().__init__("wandb")
        self.runs, self.inits = {}, []

    class Histogram:
        def __init__(self, values):
            self.values = np.asarray(values)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def __init__(self):
                self.logged = fake.runs.setdefault(kwargs["id"], [])
                self.step = self.logged[-1][0] + 1 if self.logged else 0
                self.finished = False

            def log(self, data, step):
                if step >= self.step:
                    self.logged.append((step, data))
                    self.step = step

            def finish(self):
                self.finished = True

        return Run()


def test_wandb_logs_each_round_once_across_a_resume(run, tmp_path, monkeypatch):
    _, history = run
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sink = sinks.WandB(project="fl", config={"lr": 0.05}, mode="offline")
    sink.open(tmp_path, [])
    for record in history[:3]:
        sink.write(record)
    sink.close()
    # Resumed from a checkpoint after round 1: rounds 0-1 replayed, round 2 written again.
    sink.open(tmp_path, history[:2])
    sink.write(history[2])
    sink.write(history[3])
    sink.close()
    (run_id,) = fake.runs
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    assert [i["id"] for i in fake.inits] == [run_id, run_id]
    assert fake.inits[0] == dict(dir=str(tmp_path), id=run_id, resume="allow", project="fl",
                                 entity=None, name=None, config={"lr": 0.05}, mode="offline")
    logged = fake.runs[run_id]
    assert [s for s, _ in logged] == [0, 1, 2, 3]
    for (_, data), record in zip(logged, history, strict=True):
        numbers = {k: v for k, v in data.items() if not isinstance(v, FakeWandb.Histogram)}
        assert numbers == {k.replace(".", "/"): v for k, v in sinks.scalars(record).items()}
        hists = {k: v.values for k, v in data.items() if isinstance(v, FakeWandb.Histogram)}
        if "eval_clients" in record:
            assert set(hists) == {f"{e}/{m}" for e in sinks.EVALUATIONS
                                  for m in ("num_examples", "accuracy", "loss")}
            np.testing.assert_array_equal(hists["eval_clients/accuracy"],
                                          record["eval_clients"]["accuracy"])
        else:
            assert not hists


def test_a_stopped_and_resumed_run_leaves_every_sink_holding_each_round_once(
        population, tmp_path, monkeypatch):
    """Killed after round 2 with its checkpoint after round 1 (rounds 0-2 written), then
    resumed to round 5: every sink holds rounds 0-5 once, equal to a run never
    stopped."""
    train, test = population
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    names = ("jsonl", "csv", "tensorboard")
    kwargs = _kwargs(test, checkpoint_every=2)
    whole = fs.simulate(_algo(), train, rounds=6, output_dir=tmp_path / "whole",
                        sinks=names, **kwargs)

    def crash(sim, record):
        if record["round"] == 3:  # before round 3 is written: rounds 0-2 are
            raise RuntimeError("killed")

    stopped = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="killed"):
        fs.simulate(_algo(), train, rounds=6, output_dir=stopped, callbacks=[crash],
                    sinks=names + ("wandb",), **kwargs)
    assert len((stopped / "history.jsonl").read_text().splitlines()) == 3
    resumed = fs.simulate(_algo(), train, rounds=6, output_dir=stopped, resume=True,
                          sinks=(*names, "wandb"), **kwargs)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in
                                                         whole.history]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]
    for name in ("history.jsonl", "clients.jsonl"):
        a, b = ([json.loads(x) for x in (d / name).read_text().splitlines()]
                for d in (tmp_path / "whole", stopped))
        assert strip(a) == strip(b), name
    assert [json.loads(x)["round"] for x in
            (stopped / "clients.jsonl").read_text().splitlines()] == [1, 3, 5]
    for name in ("history.csv", "clients.csv"):
        a, b = (list(csv.DictReader(open(d / name, newline="")))
                for d in (tmp_path / "whole", stopped))
        assert strip(a) == strip(b), name
    a, b = (read_events(d / "tensorboard") for d in (tmp_path / "whole", stopped))
    assert set(a[0]) == set(b[0]) and set(a[1]) == set(b[1])
    for tag in a[0]:
        if tag != "wall_time":
            assert a[0][tag] == b[0][tag], tag
    assert [s for s, _ in b[0]["train_loss"]] == list(range(6))
    assert [s for s, _ in b[1]["eval_clients/accuracy"]] == [1, 3, 5]
    logged = sys.modules["wandb"].runs[(stopped / "wandb_run_id").read_text().strip()]
    assert [s for s, _ in logged] == list(range(6))


def test_an_early_stop_writes_its_evaluation_to_the_sinks(population, tmp_path):
    train, test = population
    fs.simulate(_algo(), train, rounds=6, output_dir=tmp_path,
                callbacks=[lambda sim, record: record["round"] == 0], **_kwargs(test))
    (line,) = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert "eval" in line
    (clients,) = [json.loads(x) for x in (tmp_path / "clients.jsonl").read_text().splitlines()]
    assert clients["round"] == 0 and len(clients["eval_clients"]["accuracy"]) == 6


def test_fedbuff_writes_through_the_same_sinks(tmp_path):
    train, test = fs.data.synthetic(1.0, 1.0, num_clients=16, max_examples_per_client=30,
                                    seed=0)
    algo = fs.algorithms.fedbuff(fs.models.logistic_regression(60, 10), optax.sgd(0.05),
                                 buffer_size=2, batch_size=10)
    sim = fs.asynchronous.AsyncSimulation(
        algo, train, fs.asynchronous.lognormal_devices(16, seed=0), concurrency=4,
        num_aggregations=3, eval_data=test, eval_every=2, output_dir=tmp_path,
        sinks="jsonl,csv")
    result = sim.run()
    lines = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [x["aggregation"] for x in lines] == [0, 1, 2]
    clients = [json.loads(x) for x in (tmp_path / "clients.jsonl").read_text().splitlines()]
    assert [c["aggregation"] for c in clients] == [1, 2]  # every 2, and the last
    assert clients[-1]["eval_clients"] == _json(result.history[-1]["eval_clients"])
    rows = list(csv.DictReader(open(tmp_path / "history.csv", newline="")))
    assert [float(r["virtual_time"]) for r in rows] == [x["virtual_time"] for x in lines]


def test_bad_sinks_are_refused_before_anything_compiles(population, tmp_path, monkeypatch):
    train, _ = population
    make = lambda **kw: fs.Simulation(_algo(), train, cohort_size=4, progress=False, **kw)
    with pytest.raises(ValueError, match=r"unknown sink 'tensorbaord' \(did you mean "
                       r"'tensorboard'\?\); the sinks are jsonl, csv, tensorboard, wandb"):
        make(output_dir=tmp_path, sinks=("jsonl", "tensorbaord"))
    with pytest.raises(ValueError, match=r"unknown sink 'parquet'; the sinks are"):
        make(output_dir=tmp_path, sinks="jsonl,parquet")
    with pytest.raises(ValueError, match=r"sink 'csv' given twice"):
        make(output_dir=tmp_path, sinks=("csv", sinks.Csv()))
    with pytest.raises(ValueError, match=r"sinks \('csv',\) write into the run directory: "
                       r"give output_dir"):
        make(sinks=("csv",))
    with pytest.raises(TypeError, match=r"a sink must be a name .* or a fs.sinks.Sink, got int"):
        make(output_dir=tmp_path, sinks=[3])
    with pytest.raises(TypeError, match=r"sinks must be a sequence of sink names"):
        make(output_dir=tmp_path, sinks=sinks.Csv())
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"the wandb sink needs wandb \(Weights & Biases\): "
                       r"pip install 'fedjax_sim\[wandb\]'"):
        make(output_dir=tmp_path, sinks=("wandb",))
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ImportError, match=r"the tensorboard sink needs tensorboardX: pip "
                       r"install 'fedjax_sim\[tensorboard\]'"):
        make(output_dir=tmp_path, sinks="tensorboard")
    assert not any(tmp_path.iterdir())  # nothing written


def test_without_an_output_dir_nothing_is_written_and_with_an_empty_list_no_history(
        population, tmp_path):
    assert sinks.resolve(None, None) == ()
    assert [s.name for s in sinks.resolve(None, tmp_path)] == ["jsonl"]
    train, _ = population
    fs.simulate(_algo(), train, rounds=1, cohort_size=4, chunk_size=2, progress=False,
                output_dir=tmp_path, sinks=())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_an_earlier_runs_files_without_checkpoints_are_overwritten_with_a_warning(population,
                                                                                tmp_path):
    train, _ = population
    (tmp_path / "history.csv").write_text("round\n0\n")
    with pytest.warns(UserWarning, match=r"holds an earlier run's history.csv; this run "
                      r"overwrites it"):
        fs.Simulation(_algo(), train, cohort_size=4, chunk_size=2, progress=False,
                      output_dir=tmp_path, sinks="jsonl,csv")
    assert (tmp_path / "history.csv").read_text() == ""  # opened on the empty history
    assert (tmp_path / "history.jsonl").read_text() == ""


@pytest.mark.slow
def test_the_real_wandb_runs_offline(run, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, history = run
    sink = sinks.WandB(project="fedjax-sim-test")
    sink.open(tmp_path, history[:2])
    sink.write(history[2])
    sink.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    (offline,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    assert list(offline.glob("*.wandb")), "no W&B data file"
    assert wandb.run is None  # finished
