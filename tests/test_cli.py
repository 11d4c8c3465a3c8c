"""The `fedjax-sim` command line."""

import json

from fedjax_sim import cli


def test_run_writes_history_and_summary(tmp_path, capsys):
    code = cli.main(["run", "--rounds", "3", "--num-clients", "40", "--cohort-size", "10",
                     "--eval-every", "2", "--chunk-size", "2", "--output-dir", str(tmp_path),
                     "--no-progress"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["chunk_size"] == 2
    acc = summary["eval"]["accuracy"]
    assert 0.0 <= acc["worst10"] <= acc["p50"] <= acc["p90"] <= 1.0
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) == 3
    out = capsys.readouterr().out
    assert "per-client test accuracy over 40 clients" in out and "p90" in out
