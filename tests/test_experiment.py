"""Runs from configs (`fedjax_sim.experiment`, `fedjax-sim run CONFIG`): the run directory,
a rerun of its config.toml, and example configs end to end at tiny sizes."""

import json
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import pytest

from fedjax_sim import cli, plots
from fedjax_sim import config as C
from fedjax_sim import experiment as E

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
TINY = ["run.rounds=3", "data.num_clients=40", "sampler.cohort_size=10", "evaluation.every=2",
        "evaluation.fine_tune_steps=0"]


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "wall_time"} for line in lines]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    cfg = C.load(overrides=[*TINY, "aggregation.rule=median", "model=mlp", "model.hidden=[8]",
                            "run.chunk_size=2", "output.sinks=['jsonl', 'csv']",
                            f"output.dir={str(out)!r}"])
    return E.run(cfg, progress=False, announce=lambda _: None)


def test_the_run_directory_holds_what_reproduces_the_run(first_run):
    run_dir = first_run.output_dir
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.toml", "history.jsonl", "clients.jsonl", "history.csv", "clients.csv",
        "summary.json", "params.msgpack"}
    # Each evaluation's per-client metrics, every test client: after the second round and
    # the last (records count rounds from 0).
    lines = (run_dir / "clients.jsonl").read_text().splitlines()
    clients = [json.loads(line) for line in lines]
    assert sorted({c["round"] for c in clients}) == [1, 2]
    n = first_run.experiment.eval_data.num_clients
    assert [len(c["eval_clients"]["client_id"]) for c in clients] == [n, n]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["seed"] == 0 and summary["chunk_size"] == first_run.result.chunk_size
    env = summary["environment"]
    assert set(env) == {"fedjax_sim", "jax", "jaxlib", "python", "platform", "devices"}
    assert env["jax"] == jax.__version__ and env["devices"][0].startswith("cpu")
    written = C.load(run_dir / "config.toml")
    assert written.run.chunk_size == first_run.result.chunk_size == 2
    assert written.output.dir == str(run_dir) and written.output.sinks == ("jsonl", "csv")
    assert written.aggregation.rule == C.Median() and written.model == C.Mlp(hidden=(8,))
    params = flax.serialization.from_bytes(
        first_run.experiment.model.init(jax.random.key(0)),
        (run_dir / "params.msgpack").read_bytes())
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(first_run.result.params))


def test_rerunning_a_run_directorys_config_gives_the_same_history_bit_for_bit(first_run,
                                                                            capsys):
    run_dir = first_run.output_dir
    assert cli.main(["run", str(run_dir / "config.toml"), "--no-progress"]) == 0
    rerun = run_dir.with_name(run_dir.name + "-2")  # the first run is kept
    assert f"this run goes to {rerun}" in capsys.readouterr().out
    assert _records(rerun) == _records(run_dir)
    assert (rerun / "params.msgpack").read_bytes() == (run_dir / "params.msgpack").read_bytes()


def test_rounds_per_call_equals_the_on_device_sampler_round_by_round(tmp_path):
    """`run.rounds_per_call` from a config: one scanned program, the same records as the
    round-by-round run that draws with `sampler = "on_device"`."""
    runs = []
    for name, extra in (("scan", ["run.rounds_per_call=3"]), ("rounds", ["sampler=on_device",
                                                                       "sampler.cohort_size=10"])):
        cfg = C.load(overrides=[*TINY, "run.rounds=5", "run.chunk_size=2", *extra,
                                f"output.dir={str(tmp_path / name)!r}"])
        runs.append(E.run(cfg, progress=False, announce=lambda _: None))
    scan, rounds = runs
    assert scan.experiment.simulation["rounds_per_call"] == 3
    assert len({r["wall_time"] for r in scan.result.history}) < 5  # fewer calls than rounds
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 scan.result.params, rounds.result.params)
    for a, b in zip(_records(scan.output_dir), _records(rounds.output_dir), strict=True):
        assert a["round"] == b["round"]
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)


def test_an_unknown_key_on_the_command_line_stops_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", str(CONFIGS / "quick_start.toml"), "--set", "run.round=3",
                  "--set", f"output.dir={str(tmp_path)!r}"])
    assert e.value.code == 2
    assert "unknown config key 'run.round'; did you mean 'run.rounds'?" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_fedprox_example_config_runs_at_a_tiny_size(tmp_path, capsys):
    code = cli.main(["run", str(CONFIGS / "fedprox_heterogeneity.toml"), "--no-progress",
                     "--set", "run.rounds=2", "--set", "algorithm.num_epochs=2",
                     "--set", "evaluation.every=1", "--set", f"output.dir={str(tmp_path)!r}"])
    assert code == 0
    records = _records(tmp_path)
    assert len(records) == 2 and all("eval" in r for r in records)
    # FedProx's 90% stragglers run fewer epochs; evaluated on the training population.
    assert "per-client train accuracy over 30 of 30 clients" in capsys.readouterr().out


def test_the_devices_example_config_runs_its_clock_at_a_tiny_size(tmp_path):
    assert cli.main(["run", str(CONFIGS / "devices_deadline.toml"), "--no-progress",
                     "--set", "run.rounds=2", "--set", "data.num_clients=40",
                     "--set", "sampler.cohort_size=5", "--set", "algorithm.num_epochs=1",
                     "--set", "devices.deadline=2.0", "--set", "evaluation.every=0",
                     "--set", f"output.dir={str(tmp_path)!r}"]) == 0
    records = _records(tmp_path)
    assert all(0 < r["round_time"] <= 2.0 for r in records)
    assert records[-1]["virtual_time"] == pytest.approx(sum(r["round_time"] for r in records))


def test_the_fedbuff_example_config_runs_asynchronously_at_a_tiny_size(tmp_path):
    assert cli.main(["run", str(CONFIGS / "fedbuff_vs_fedavg_fedbuff.toml"), "--no-progress",
                     "--set", "run.rounds=4", "--set", "data.num_clients=40",
                     "--set", "algorithm.concurrency=8", "--set", "algorithm.buffer_size=2",
                     "--set", "evaluation.every=2",
                     "--set", f"output.dir={str(tmp_path)!r}"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["aggregations"] == 4 and summary["buffer_size"] == 2
    assert summary["chunk_size"] == 1 and "environment" in summary
    # The config left the chunk size unset; the one the run used is written back.
    assert C.load(tmp_path / "config.toml").run.chunk_size == 1
    times = [r["virtual_time"] for r in _records(tmp_path)]
    assert times == sorted(times) and times[0] > 0
    assert (tmp_path / "params.msgpack").stat().st_size > 0


def test_a_dry_run_prints_the_resolved_config_and_trains_nothing(tmp_path, capsys):
    assert cli.main(["run", "--dry-run", "--aggregator", "trimmed_mean", "--trim", "0.2",
                     "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    printed = C.load(text=out.split("# built:")[0])
    assert printed.aggregation.rule == C.TrimmedMean(beta=0.2)
    assert "nothing trained" in out and not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """`fedjax-sim sweep`: two client learning rates x two seeds, one vmapped program."""
    out = tmp_path_factory.mktemp("sweeps") / "s"
    assert cli.main(["sweep", "--rounds", "3", "--num-clients", "40", "--cohort-size", "10",
                     "--eval-every", "2", "--chunk-size", "2", "--grid", "client_lr=0.03,0.1",
                     "--seeds", "2", "--seed", "5", "--output-dir", str(out),
                     "--no-progress"]) == 0
    return out


def test_a_sweep_directory_holds_every_run_and_its_own_config(swept, capsys):
    sweep = json.loads((swept / "sweep.json").read_text())
    names = [r["name"] for r in sweep["runs"]]
    assert names == ["client_lr=0.03,seed=5", "client_lr=0.03,seed=6",
                     "client_lr=0.1,seed=5", "client_lr=0.1,seed=6"]
    assert C.load(swept / "config.toml").sweep == C.Sweep(seeds=2,
                                                          grid={"client_lr": (0.03, 0.1)})
    for name in names:
        cfg = C.load(swept / name / "config.toml")
        assert cfg.sweep == C.Sweep() and cfg.run.data_seed == 5  # the sweep's population
        assert f"client_lr={cfg.client_optimizer.learning_rate:g},seed={cfg.run.seed}" == name
        assert {"history.jsonl", "clients.jsonl", "summary.json", "params.msgpack"} <= {
            p.name for p in (swept / name).iterdir()}
    groups = plots.group_runs(plots.load_runs([swept]))
    assert [len(g.runs) for g in groups] == [2, 2]  # the seeds of each learning rate


def test_a_run_of_a_sweep_rerun_alone_gives_the_same_history(swept, tmp_path, capsys):
    run_dir = swept / "client_lr=0.1,seed=6"
    assert cli.main(["run", str(run_dir / "config.toml"), "--output-dir", str(tmp_path / "one"),
                     "--no-progress"]) == 0
    alone, swept_records = _records(tmp_path / "one"), _records(run_dir)
    assert [r["round"] for r in alone] == [r["round"] for r in swept_records] == [0, 1, 2]
    for a, b in zip(alone, swept_records, strict=True):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)
        if "eval" in a:
            np.testing.assert_allclose(a["eval"]["accuracy"]["weighted_mean"],
                                       b["eval"]["accuracy"]["weighted_mean"], atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--grid", "client_lr=0.1,fast"], "--grid takes FIELD=V1,V2,... with numbers"),
    (["sweep", "--grid", "client_rl=0.1,0.2"], "did you mean 'client_lr'?"),
    (["sweep", "--grid", "mu=0.1,1.0"], "grid over 'mu': this algorithm cannot trace it"),
    (["sweep", "--grid", "client_lr=0.1,0.2", "--fine-tune-steps", "5"],
     "a sweep cannot run evaluation.fine_tune_steps"),
    (["sweep", "--rounds", "3"], "a sweep of one run: give --grid"),
    (["run", "--set", "sweep.seeds=3"], "this config describes a sweep"),
])
def test_a_sweep_that_cannot_run_is_refused_before_anything_compiles(argv, message, tmp_path,
                                                                     capsys, monkeypatch):
    import fedjax_sim.sweep as sweep_lib

    monkeypatch.setattr(sweep_lib.Sweep, "run", lambda *a, **k: pytest.fail("it ran"))
    with pytest.raises(SystemExit):
        cli.main([*argv, "--num-clients", "40", "--cohort-size", "10",
                  "--output-dir", str(tmp_path / "s"), "--no-progress"])
    assert message in capsys.readouterr().err
