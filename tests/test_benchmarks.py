"""The benchmark suite's analytic counts (benchmarks/workloads.py) against the models and XLA,
and the suite end to end on a tiny plan."""

import datetime
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import suite  # noqa: E402
import workloads  # noqa: E402
from run_fedjax_sim import build_model, plain_steps  # noqa: E402
from workloads import SEQ_LEN, WORKLOADS, client_data  # noqa: E402


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_param_count_matches_the_model(name):
    w = WORKLOADS[name]
    params = build_model(w).init(jax.random.key(0))
    assert sum(p.size for p in jax.tree.leaves(params)) == w.num_params


@pytest.mark.parametrize("name", ["W1", "W2", "W3"])
def test_flops_match_xla_cost_analysis_of_one_step(name):
    """XLA counts one un-looped gradient step exactly. The analytic count leaves out
    elementwise work: it must be within 3% below XLA's. (Not the LSTM: XLA counts its scan
    body once, and on one-token sequences it folds away the products with the zero initial
    state, so no XLA count equals a round's.)"""
    w = WORKLOADS[name]
    model = build_model(w)
    params = model.init(jax.random.key(0))
    x, y = client_data(w, 1)
    b = w.batch_size
    batch = {"x": jnp.asarray(x[:b]), "y": jnp.asarray(y[:b])}
    want = b * w.flops_per_example()
    grad = jax.jit(jax.grad(lambda p: jnp.mean(model.loss(p, batch, jax.random.key(1)))))
    cost = grad.lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert 0.97 * cost["flops"] <= want <= cost["flops"], (want, cost["flops"])


def test_client_data_is_seeded_and_shaped():
    w = WORKLOADS["W4"]
    x, y = client_data(w, 3)
    assert x.shape == y.shape == (300, SEQ_LEN)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])    # y is x shifted by one token
    assert x.min() >= 1 and x.max() < w.num_classes       # no PAD
    x2, _ = client_data(w, 3)
    np.testing.assert_array_equal(x, x2)


def test_derive_roofline_and_ratios():
    w = WORKLOADS["W1"]
    rows = [{"workload": "W1", "cohort": 100, "system": "fedjax_sim", "variant": None,
             "s_per_round": 0.5, "chunk_size": 4, "devices": 2, "temp_mb": 8.0,
             "plain_steps_s": 0.25,
             "limits_beside": {"peak_gflops": 50.0, "bandwidth_gbs": 0.5e-3}},
            {"workload": "W1", "cohort": 100, "system": "fedjax", "variant": None,
             "s_per_round": 2.0, "first_round_s": 5.0, "round_s": [2.0, 1.5, 2.5]},
            {"workload": "W1", "cohort": 100, "system": "pfl", "error": "not installed"}]
    device = {"peak_gflops": 100.0, "bandwidth_gbs": 1e-3}   # memory-bound on purpose
    suite.derive(rows, device)
    floor = w.traffic_bytes_per_round(100) / 1e6
    assert rows[0]["roofline_floor_s"] == pytest.approx(floor)
    assert rows[0]["roofline_fraction"] == pytest.approx(floor / 0.5)
    assert rows[1]["fedjax_sim_speedup"] == pytest.approx(4.0)
    assert rows[0]["measured_bytes_per_client"] == pytest.approx(8 * 2**20 / 8)
    assert rows[0]["plain_steps_roofline_fraction"] == pytest.approx(floor / 0.25)
    # Against the limits measured beside the run (half the bandwidth: twice the floor).
    assert rows[0]["roofline_fraction_beside"] == pytest.approx(2 * floor / 0.5)
    assert "roofline_fraction_beside" not in rows[1]
    assert "plain_steps_roofline_fraction" not in rows[1]
    assert rows[1]["compile_s"] == pytest.approx(3.5)  # FedJAX compiles in its first round
    assert "roofline_fraction" not in rows[2]
    device["bandwidth_gbs"] = 1e9                             # now compute-bound
    suite.derive(rows, device)
    assert rows[0]["roofline_floor_s"] == pytest.approx(w.flops_per_round(100) / 100e9)


def test_plain_steps_are_the_rounds_sgd_steps():
    """The steps-only reference runs cohort x steps-per-client SGD steps, no fewer."""
    w = WORKLOADS["W2"]
    model = build_model(w)
    params = model.init(jax.random.key(0))
    x, y = client_data(w, 1)
    batch = {"x": jnp.asarray(x[:w.batch_size]), "y": jnp.asarray(y[:w.batch_size])}
    out = plain_steps(w, model, 2, None)(params, batch)
    expected = params
    for _ in range(2 * w.steps_per_client):
        g = jax.grad(lambda p: jnp.mean(model.loss(p, batch, jax.random.key(0))))(expected)
        expected = jax.tree.map(lambda a, b: a - w.client_lr * b, expected, g)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6)
        assert a.shape[0] == 1


def test_passes_pair_ratios_within_a_pass_and_keep_the_median():
    def row(system, s, repeat, **kw):
        return {"workload": "W2", "cohort": 1000, "system": system, "variant": None,
                "repeat": repeat, "s_per_round": s, "s_per_round_min": s, "round_s": [s],
                "first_round_s": 3 * s, **kw}

    # The machine slows down in pass 1 (both systems 2x slower): the ratio stays 10.
    rows = [row("fedjax_sim", 0.1, 0), row("fedjax", 1.0, 0),
            row("fedjax_sim", 0.2, 1), row("fedjax", 2.0, 1),
            row("fedjax_sim", 0.11, 2), row("fedjax", 1.32, 2),
            row("pfl", 3.0, 0), {**row("pfl", 0, 1), "error": "timed out"}]
    suite.derive(rows, {"peak_gflops": 100.0, "bandwidth_gbs": 10.0})
    assert [r["fedjax_sim_speedup"] for r in rows[1:6:2]] == pytest.approx([10, 10, 12])
    out = {r["system"]: r for r in suite.combine_passes(rows)}
    assert out["fedjax_sim"]["s_per_round"] == 0.11   # the median pass
    assert out["fedjax"]["s_per_round"] == 1.32
    assert out["fedjax"]["fedjax_sim_speedup"] == pytest.approx(10)  # not 1.32 / 0.11 = 12
    assert [p["s_per_round"] for p in out["fedjax"]["passes"]] == [1.0, 2.0, 1.32]
    assert out["pfl"]["s_per_round"] == 3.0 and out["pfl"]["passes"][1]["error"]
    assert "repeat" not in out["fedjax"]
    # A row merged into an earlier run's file is compared with that file's fedjax_sim row.
    new = [row("fedjax", 1.5, 0)]
    suite.derive(new, {"peak_gflops": 100.0, "bandwidth_gbs": 10.0},
                 kept=[out["fedjax_sim"], out["fedjax"]])
    assert new[0]["fedjax_sim_speedup"] == pytest.approx(1.5 / 0.11)


def test_device_limits_are_the_higher_of_the_start_and_end_measurements():
    start = {"matmul_gflops": {"1024^3": 113.1, "2048^3": 119.3}, "peak_gflops": 119.3,
             "bandwidth_gbs": 26.6, "platform": "cpu"}
    end = {"matmul_gflops": {"1024^3": 156.6, "2048^3": 144.8}, "peak_gflops": 156.6,
           "bandwidth_gbs": 16.3, "platform": "cpu"}
    best = suite.best_limits(start, end)
    assert best["matmul_gflops"] == {"1024^3": 156.6, "2048^3": 144.8}
    assert (best["peak_gflops"], best["bandwidth_gbs"], best["platform"]) == (156.6, 26.6, "cpu")


def test_plans_name_known_systems_and_workloads():
    for name in ("quick", "cpu", "gpu"):
        runs = suite.plan(name)
        assert runs and all(r.system in suite.SYSTEMS and r.workload in WORKLOADS
                            for r in runs)
        # Every workload and cohort that a peer runs has a headline fedjax_sim row to
        # compare with.
        head = {(r.workload, r.cohort) for r in runs
                if r.system == "fedjax_sim" and r.variant is None}
        assert {(r.workload, r.cohort) for r in runs} <= head
        # One (workload, cohort) pass at a time, its headline fedjax_sim run first; every
        # second pass runs the systems of the pass before in reverse (headline last).
        assert len(set(r.key for r in runs)) == len(runs)
        passes = {}
        for r in runs:
            passes.setdefault((r.workload, r.cohort, r.repeat), []).append(r)
        cells = [(r.workload, r.cohort, r.repeat) for r in runs]
        assert cells == sorted(cells, key=list(passes).index)  # each pass contiguous
        for (w, c, i), members in passes.items():
            head = members[-1] if i % 2 else members[0]
            assert head.system == "fedjax_sim" and head.variant is None
            if i:
                keys = [r.key[:4] for r in members]
                before = [r.key[:4] for r in passes[w, c, i - 1] if r.key[:4] in keys]
                assert keys == before[::-1]
    with pytest.raises(ValueError, match="unknown suite"):
        suite.plan("tpu")


def test_peers_run_in_their_environment_or_in_peer_python(tmp_path, monkeypatch):
    monkeypatch.delenv("PEER_PYTHON", raising=False)
    monkeypatch.setattr(suite, "PEERS", tmp_path)
    pinned = suite.Run("W1", 100, "fedjax")
    current = suite.Run("W1", 100, "fedjax", variant="current JAX", env="fedjax-current")
    assert suite.command(pinned) is None and suite.command(current) is None  # not set up
    python = tmp_path / ".venv-fedjax-current" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch()
    assert suite.command(pinned) is None
    cmd = suite.command(current)
    assert cmd[:2] == [str(python), str(tmp_path / "run_fedjax.py")]
    assert cmd[2:4] == ["--workload", "W1"]
    # On a machine where one interpreter holds every peer, PEER_PYTHON runs them all.
    monkeypatch.setenv("PEER_PYTHON", "/opt/python3")
    assert suite.command(pinned)[:2] == ["/opt/python3", str(tmp_path / "run_fedjax.py")]
    assert suite.command(suite.Run("W1", 100, "pfl"))[0] == "/opt/python3"
    assert suite.command(suite.Run("W1", 100, "fedjax_sim"))[0] == sys.executable


def test_scaling_names_where_throughput_levels_off():
    def row(cohort, clients_per_s, **kw):
        return {"workload": "W1", "cohort": cohort, "system": "fedjax_sim", "chunk_size": 4,
                "devices": 2, "clients_per_s": clients_per_s,
                "footprint_bytes_per_client": 1.5e6, "measured_bytes_per_client": 6e5, **kw}

    rows = [row(10, 50.0), row(100, 92.0), row(1000, 100.0),
            row(1000, 300.0, variant="1 device"),  # not the headline: left out
            {"workload": "W1", "cohort": 1000, "system": "fedjax", "clients_per_s": 10.0}]
    lines = suite.scaling(rows)
    assert "90% of the best (100 clients/s, at 1000 clients) at 100 clients" in lines[0]
    table = [ln for ln in lines if ln.startswith("| 10")]
    assert table == ["| 10 | 4 x2 dev | 50.0 | 50% | 1.50 MB | 0.60 MB |",
                     "| 100 | 4 x2 dev | 92.0 | 92% | 1.50 MB | 0.60 MB |",
                     "| 1000 | 4 x2 dev | 100.0 | 100% | 1.50 MB | 0.60 MB |"]
    one = suite.scaling([row(10, 5.0, measured_bytes_per_client=None)])
    assert not any("90%" in ln for ln in one) and one[-2].endswith("| 1.50 MB | - MB |")
    assert suite.scaling([rows[-1]]) == []


def test_lazy_compile_time_is_the_first_rounds_excess_over_the_fastest():
    row = {"first_round_s": 10.0, "round_s": [3.0, 2.5, 4.0]}
    assert suite.lazy_compile_s(row) == pytest.approx(7.5)
    assert suite.lazy_compile_s({"first_round_s": 45.1, "round_s": [45.3, 54.7]}) is None


def test_time_rounds_times_at_least_rounds_and_min_seconds(monkeypatch):
    calls = []

    def run_round():
        calls.append(1)
        time.sleep(0.002)

    timing = workloads.time_rounds(run_round, 3)
    assert len(calls) == 4 and len(timing["round_s"]) == 3  # one warm-up, three timed
    calls.clear()
    timing = workloads.time_rounds(run_round, 3, min_seconds=0.05)
    assert sum(timing["round_s"]) >= 0.05 and len(timing["round_s"]) > 3
    assert len(calls) == len(timing["round_s"]) + 1
    monkeypatch.setattr(workloads, "MAX_TIMED_ROUNDS", 5)
    assert len(workloads.time_rounds(run_round, 3, min_seconds=100.0)["round_s"]) == 5


def test_min_seconds_goes_to_the_drivers_that_run_their_own_rounds():
    for run in suite.plan("cpu"):
        args = suite.driver_args(run)
        assert ("--min-seconds" in args) == (run.system in ("fedjax_sim", "loop", "fedjax"))


def fake_device(gflops):
    return {"matmul_gflops": {"1024^3": gflops}, "peak_gflops": gflops, "bandwidth_gbs": 20.0,
            "platform": "cpu", "device_kind": "cpu", "device_count": 1, "jax_version": "x"}


def fake_execute(executed, fail_after=None):
    """A stand-in for running a driver: s/round 0.1, 0.2, ... in the order runs execute."""
    def execute(run, timeout, log):
        if fail_after is not None and len(executed) == fail_after:
            raise KeyboardInterrupt  # the session ends mid-suite
        executed.append((run.workload, run.cohort, run.system, run.variant))
        return {"workload": run.workload, "cohort": run.cohort, "system": run.system,
                "variant": run.variant, "repeat": run.repeat,
                "s_per_round": 0.1 * len(executed), "s_per_round_min": 0.1, "round_s": [0.1],
                "first_round_s": 1.1, "compile_s": 1.0, "peak_mem_mb": 100.0}
    return execute


def read_results(out_dir):
    path = next(p for p in out_dir.glob("quick-*.json") if not p.name.endswith(".meta.json"))
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


@pytest.mark.slow  # a suite subprocess: 7 s
def test_the_suites_own_process_never_opens_the_device():
    """On a GPU, a process that opens the device with JAX holds 75% of its memory until it
    exits: the suite measures the device in child processes."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import suite; "
            "info = suite.device_info(); limits = suite.limits_beside(); "
            "assert 'jax' not in sys.modules, 'the suite imported jax'; "
            "assert info['device_count'] >= 1 and limits['peak_gflops'] > 0; "
            "assert limits['bandwidth_gbs'] > 0")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=BENCH.parent, timeout=300)


def test_an_interrupted_suite_resumes_without_rerunning_finished_runs(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(suite, "measure_device",
                        lambda quick: measured.append(1) or fake_device(100.0))
    beside = []
    monkeypatch.setattr(suite, "limits_beside",
                        lambda: beside.append(1) or {"peak_gflops": 50.0, "bandwidth_gbs": 9.0})
    executed = []
    runs = suite.plan("quick")
    monkeypatch.setattr(suite, "execute", fake_execute(executed, fail_after=3))
    with pytest.raises(KeyboardInterrupt):
        suite.main(["quick", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.glob("*.json"))
    monkeypatch.setattr(suite, "execute", fake_execute(executed))
    measured.clear()
    suite.main(["quick", "--out-dir", str(tmp_path), "--resume"])
    assert len(measured) == 1  # at the end only: the start is the interrupted run's
    assert executed == [(r.workload, r.cohort, r.system, r.variant) for r in runs]
    rows, table = read_results(tmp_path)
    assert len(rows) == len({r.key[:4] for r in runs})  # the passes of a cell make one row
    # The three runs finished before the interruption keep their measurements.
    assert [r["s_per_round"] for r in rows[:3]] == pytest.approx([0.1, 0.2, 0.3])
    assert not list(tmp_path.glob("*.partial.jsonl"))
    # Every fedjax_sim run, and only those, has the limits measured beside it, once.
    sims = [r for r in runs if r.system == "fedjax_sim"]
    assert len(beside) == len(sims)
    for r in rows:
        assert (r["system"] == "fedjax_sim") == ("roofline_fraction_beside" in r)
        assert (r["system"] == "fedjax_sim") == (" (" in _roofline_cell(table, r))


def _roofline_cell(table: str, row: dict) -> str:
    """The roofline % cell of `row`'s line in the Markdown table."""
    line = next(ln for ln in table[table.index(f"## {row['workload']}"):].splitlines()
                if ln.startswith(f"| {row['cohort']} | {row['system']} |"))
    return line.split("|")[11]


@pytest.mark.slow  # two suite runs: 8 s
def test_a_merged_run_replaces_its_rows_and_keeps_the_others_limits(tmp_path, monkeypatch):
    # Each run ends an hour after the one before (the real clock would give them one second).
    hours = iter(range(24))
    clock = types.SimpleNamespace(now=lambda tz: datetime.datetime(2026, 1, 1, next(hours),
                                                                   tzinfo=tz))
    monkeypatch.setattr(suite, "dt", types.SimpleNamespace(UTC=datetime.UTC, datetime=clock))
    monkeypatch.setattr(suite, "measure_device", lambda quick: fake_device(100.0))
    monkeypatch.setattr(suite, "limits_beside", lambda: {"peak_gflops": 50.0,
                                                         "bandwidth_gbs": 9.0})
    monkeypatch.setattr(suite, "execute", fake_execute([]))
    suite.main(["quick", "--out-dir", str(tmp_path)])
    before, _ = read_results(tmp_path)
    monkeypatch.setattr(suite, "measure_device", lambda quick: fake_device(150.0))
    suite.main(["quick", "--workloads", "W2", "--out-dir", str(tmp_path), "--merge"])
    after, table = read_results(tmp_path)
    assert len(after) == len(before)
    for old, new in zip(sorted(before, key=suite.row_key), sorted(after, key=suite.row_key),
                        strict=True):
        if new["workload"] == "W2":  # measured again, against this run's limits
            assert new["peak_gflops"] == 150.0 and new["s_per_round"] != old["s_per_round"]
        else:
            assert new == old
    w1 = table[table.index("## W1"):table.index("## W2")]
    assert "earlier run" in w1 and "100.0 GFLOP/s" in w1
    assert "earlier run" not in table[table.index("## W2"):]
    # The header names the runs the rows come from; the meta file dates this run.
    meta = json.loads(next(tmp_path.glob("quick-*.meta.json")).read_text())
    dates = sorted({r["date"] for r in after})
    assert len(dates) == 2 and meta["row_dates"] == dates and meta["date"] == dates[1]
    assert f"The rows come from 2 runs, ending {dates[0]}, {dates[1]}" in table
    # Merged again over W2 only: the first run's W1 rows stay, so still two runs.
    suite.main(["quick", "--workloads", "W2", "--out-dir", str(tmp_path), "--merge"])
    again, _ = read_results(tmp_path)
    assert {r["date"] for r in again if r["workload"] == "W1"} == {dates[0]}


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path):
    """fedjax_sim and the loop through the real drivers; the peers may be absent (rows with
    an error), which the report must list."""
    subprocess.run([sys.executable, str(BENCH / "suite.py"), "quick", "--systems",
                    "fedjax_sim", "loop", "--workloads", "W2", "--out-dir", str(tmp_path)],
                   check=True, timeout=600)
    (out,) = [p for p in tmp_path.glob("quick-*.json") if not p.name.endswith(".meta.json")]
    rows = json.loads(out.read_text())
    assert sorted(r["system"] for r in rows) == ["fedjax_sim", "loop"]  # 2 passes, combined
    for r in rows:
        assert r["s_per_round"] > 0 and len(r["round_s"]) == 2 and len(r["passes"]) == 2
        assert r["fedjax_sim_speedup"] > 0 and 0 < r["roofline_fraction"]
    sim = next(r for r in rows if r["system"] == "fedjax_sim")
    assert not sim["recompiled"] and 0 < sim["plain_steps_s"]
    assert sim["limits_beside"]["peak_gflops"] > 0 and sim["roofline_fraction_beside"] > 0
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "| 100 | loop |" in out.with_suffix(".md").read_text()
