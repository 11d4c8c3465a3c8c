"""The `fedjax-sim` command line."""

import json
import warnings

import pytest

from fedjax_sim import cli

ARGS = ["run", "--rounds", "3", "--num-clients", "40", "--cohort-size", "10", "--eval-every", "2",
        "--no-progress", "--fine-tune-steps", "0"]


def test_run_writes_history_and_summary(tmp_path, capsys):
    code = cli.main(ARGS + ["--chunk-size", "2", "--output-dir", str(tmp_path),
                            "--fine-tune-steps", "5"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["chunk_size"] == 2 and summary["seed"] == 0
    assert summary["chunk_size_source"] == "given"
    acc = summary["eval"]["accuracy"]
    assert 0.0 <= acc["worst10"] <= acc["p50"] <= acc["p90"] <= 1.0
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert all(json.loads(line)["chunk_size"] == 2 for line in lines)
    out = capsys.readouterr().out
    assert "per-client test accuracy over 40 of 40 clients" in out and "p90" in out
    # The global model's distribution beside the fine-tuned one, and which clients it helps.
    tuned = summary["eval_personal"]["accuracy"]
    assert tuned["p50"] > acc["p50"]  # Synthetic(1,1)'s clients each need their own model
    assert "global model:" in out and "fine-tuned, 5 steps:" in out
    assert "fine-tuning helps" in out
    # The rounds' time is apart from the compile (and search) before them.
    assert "3 rounds in " in out and "before them chunk size 2 (given), compile " in out
    assert "rerun exactly with --seed 0 --chunk-size 2" in out


def test_an_earlier_run_is_kept_and_the_next_goes_to_a_numbered_directory(tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("FEDJAX_SIM_CACHE_DIR", str(tmp_path / "cache"))
    out_dir = tmp_path / "synthetic"
    assert cli.main(ARGS + ["--output-dir", str(out_dir)]) == 0
    first = (out_dir / "history.jsonl").read_text()
    assert cli.main(ARGS + ["--output-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{out_dir} holds an earlier run (kept); this run goes to {out_dir}-2" in out
    assert (out_dir / "history.jsonl").read_text() == first
    second = json.loads((tmp_path / "synthetic-2" / "summary.json").read_text())
    assert second["chunk_size_source"] == "cache"  # the first run's search, reused
    assert "chunk-size search" in out and "from an earlier run's search" in out
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "wall_time"}
                          for line in text.splitlines()]
    assert strip(first) == strip((tmp_path / "synthetic-2" / "history.jsonl").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning about overwriting
        assert cli.main(ARGS + ["--output-dir", str(out_dir), "--overwrite"]) == 0
    assert not (tmp_path / "synthetic-3").exists()


def test_help_gives_every_flag_a_line_and_its_default(capsys):
    try:
        cli.main(["run", "--help"])
    except SystemExit as e:
        assert e.code == 0
    text = capsys.readouterr().out
    assert "training rounds (default: 200)" in text
    assert "client learning rate (default: 0.05)" in text
    parser = cli.build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    for action in run._actions:
        assert action.help, f"{action.option_strings} has no help line"


def test_dp_flags_calibrate_the_noise_to_the_target_epsilon_and_record_it(tmp_path, capsys):
    code = cli.main(ARGS + ["--chunk-size", "2", "--output-dir", str(tmp_path), "--dp-clip",
                            "0.5", "--target-epsilon", "20"])
    assert code == 0
    out = capsys.readouterr().out
    assert "noise multiplier " in out and "user-level DP: epsilon " in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    spent = summary["privacy"]
    assert spent["rounds"] == 3 and 15 < spent["epsilon"] <= 20 + 1e-9
    assert spent["delta"] == 40 ** -1.1 and spent["target_epsilon"] == 20
    eps = [json.loads(line)["epsilon"] for line in
           (tmp_path / "history.jsonl").read_text().splitlines()]
    assert eps == sorted(eps) and eps[-1] == spent["epsilon"]


def test_dp_flags_without_a_clip_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(ARGS + ["--noise-multiplier", "1.0"])
    assert e.value.code == 2
    assert "--noise-multiplier needs --dp-clip" in capsys.readouterr().err


@pytest.mark.parametrize("algorithm", ["ditto", "fedrep", "ifca"])
def test_a_personalization_algorithm_reports_its_personal_models(algorithm, tmp_path, capsys):
    code = cli.main(ARGS + ["--algorithm", algorithm, "--model", "mlp", "--chunk-size", "2",
                            "--output-dir", str(tmp_path)])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["eval_personal"]["accuracy"]) >= {"p10", "p50", "worst10"}
    out = capsys.readouterr().out
    assert f"{algorithm}'s personal models:" in out and "personal model helps" in out


def test_personalization_flags_that_do_not_fit_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(ARGS + ["--algorithm", "fedrep", "--output-dir", str(tmp_path)])
    assert "Dense_1" in capsys.readouterr().err  # the logistic model has no such head
    with pytest.raises(SystemExit):
        cli.main(ARGS + ["--algorithm", "ditto", "--trainable", "Dense_0",
                         "--output-dir", str(tmp_path)])
    assert "--trainable is for --algorithm fedavg" in capsys.readouterr().err


def test_a_rolling_sample_of_the_test_clients_reports_the_means_interval(tmp_path, capsys):
    assert cli.main(ARGS + ["--eval-clients", "15", "--eval-rolling", "--chunk-size", "2",
                            "--output-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval"]["accuracy"]["mean_ci95"] > 0
    out = capsys.readouterr().out
    assert "over 15 of 40 clients" in out and "±" in out


def test_device_flags_run_the_virtual_clock_and_bad_ones_are_named(tmp_path, capsys):
    flags = ["--devices", "lognormal", "--deadline", "30", "--keep-partial", "--dropout", "0.2",
             "--over-selection", "1.3", "--availability", "diurnal", "--day-length", "600",
             "--chunk-size", "2", "--output-dir", str(tmp_path)]
    assert cli.main(ARGS + flags) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert summary["virtual_time"] == lines[-1]["virtual_time"] > 0
    assert all(r["num_sampled"] <= 13 and r["round_time"] <= 30 for r in lines)
    assert "num_partial" in lines[0] and "num_available" in lines[0]
    assert "virtual clock: " in capsys.readouterr().out
    csv_path = tmp_path / "devices.csv"
    csv_path.write_text("client,example_time_s,download_Bps\n0,0.1,5\n")
    for extra, message in ((["--devices", str(csv_path)], "missing column"),
                           (["--deadline", "5"], "--deadline needs --devices"),
                           (["--devices", "phones.txt"], "--devices must be 'lognormal'"),
                           (["--devices", "lognormal", "--dropout", "1"], "dropout must be"),
                           (["--devices", "lognormal", "--deadline", "0"], "must be > 0")):
        with pytest.raises(SystemExit):
            cli.main(ARGS + extra + ["--output-dir", str(tmp_path / "bad")])
        assert message in capsys.readouterr().err


def test_a_robust_aggregator_replaces_the_mean(tmp_path, capsys):
    code = cli.main(ARGS + ["--chunk-size", "2", "--output-dir", str(tmp_path),
                            "--aggregator", "krum", "--krum-f", "2"])
    assert code == 0
    assert json.loads((tmp_path / "summary.json").read_text())["aggregator"] == "krum"
    rounds = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["server"]["krum_selected"] for r in rounds] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("flags, error", [
    (["--aggregator", "krum", "--krum-f", "4"],
     "krum with f = 4 Byzantine clients needs a cohort of n > 2f + 2 = 10 clients, got n = 10"),
    (["--aggregator", "trimmed_mean", "--trim", "0.5"], "must be in [0, 0.5), got 0.5"),
    (["--aggregator", "median", "--trim", "0.1"],
     "--trim is for --aggregator trimmed_mean, not median"),
    (["--krum-m", "3"], "--krum-m is for --aggregator multi_krum, not mean"),
    (["--aggregator", "geometric_median", "--dp-clip", "1.0", "--noise-multiplier", "1.0"],
     "aggregation.rule 'geometric_median' replaces the mean that dp_fedavg noises"),
])
def test_robust_flags_that_do_not_fit_are_refused_before_training(flags, error, tmp_path,
                                                                  capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(ARGS + ["--output-dir", str(tmp_path)] + flags)
    assert e.value.code == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "history.jsonl").exists()
