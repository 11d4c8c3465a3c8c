"""Plots: grouping by seed, the band and quantile math, the figures' axes and lines, files."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fedjax_sim import cli, plots

ROUNDS = 6
EVALS = (1, 3, 5)


def write_run(directory, seed, lr, *, config=True, clock=False, personal=False,
              step="round", clients=8):
    """A run directory as the jsonl sink writes it, with values drawn from (seed, lr)."""
    rng = np.random.default_rng([seed, int(lr * 1000)])
    directory.mkdir(parents=True)
    history, evals = [], []
    for r in range(ROUNDS):
        line = {step: r, "train_loss": float(2.0 - lr * r + 0.1 * rng.standard_normal())}
        if clock:
            line["virtual_time"] = float(10.0 * (r + 1) + rng.uniform())
        if r in EVALS:
            acc = np.clip(lr * r + 0.2 * rng.standard_normal(clients), 0, 1)
            line["eval"] = {"accuracy": {"weighted_mean": float(acc.mean()), "p50": 0.0},
                            "loss": {"weighted_mean": float(3.0 - acc.mean())}}
            ev = {step: r, "eval_clients": {"client_id": [f"c{i}" for i in range(clients)],
                                            "accuracy": acc.tolist()}}
            if personal:
                ev["eval_personal_clients"] = {"accuracy": np.minimum(acc + 0.3, 1).tolist()}
            evals.append(ev)
        history.append(line)
    (directory / "history.jsonl").write_text("".join(json.dumps(x) + "\n" for x in history))
    (directory / "clients.jsonl").write_text("".join(json.dumps(x) + "\n" for x in evals))
    if config:
        (directory / "config.toml").write_text(
            f'[run]\nseed = {seed}\nchunk_size = {seed + 1}\n\n[output]\ndir = "{directory}"\n'
            f'\n[client_optimizer]\nlearning_rate = {lr}\nname = "sgd"\n')
    return directory


@pytest.fixture
def grid(tmp_path):
    """Two learning rates x three seeds, each with a config.toml."""
    return [write_run(tmp_path / f"lr{lr}-s{s}", s, lr, clock=True)
            for lr in (0.05, 0.1) for s in range(3)]


def test_runs_that_differ_only_in_seed_form_one_group(grid):
    groups = plots.group_runs(plots.load_runs(grid))
    assert [g.label for g in groups] == ["learning_rate=0.05", "learning_rate=0.1"]
    assert [[r.directory for r in g.runs] for g in groups] == [grid[:3], grid[3:]]


def test_the_band_is_the_t_interval_of_the_mean_over_seeds(grid):
    (g, _) = plots.group_runs(plots.load_runs(grid))
    xs, mean, low, high = plots.group_curve(g, "train_loss")
    loss = np.array([[json.loads(x)["train_loss"]
                      for x in (d / "history.jsonl").read_text().splitlines()]
                     for d in grid[:3]])
    np.testing.assert_array_equal(xs, np.arange(ROUNDS))
    np.testing.assert_allclose(mean, loss.mean(axis=0))
    t_975_df2 = 4.302652729749464  # Student's t table, 2 degrees of freedom
    half = t_975_df2 * loss.std(axis=0, ddof=1) / np.sqrt(3)
    np.testing.assert_allclose(high - mean, half)
    np.testing.assert_allclose(mean - low, half)
    # An evaluation metric exists at the evaluated rounds only; its summary's weighted mean.
    xs, mean, _, _ = plots.group_curve(g, "eval.accuracy")
    assert xs.tolist() == list(EVALS)
    # Against the virtual clock, x is the seeds' mean clock at each round.
    xs, _, _, _ = plots.group_curve(g, "train_loss", x="virtual_time")
    clock = np.array([[json.loads(x)["virtual_time"]
                       for x in (d / "history.jsonl").read_text().splitlines()]
                      for d in grid[:3]])
    np.testing.assert_allclose(xs, clock.mean(axis=0))


def test_the_band_covers_the_true_mean_95_percent_of_the_time():
    draws = np.random.default_rng(0).standard_normal((5, 4000)) + 3.0
    _, low, high = plots.mean_band(draws)
    coverage = np.mean((low <= 3.0) & (3.0 <= high))
    assert 0.935 < coverage < 0.965
    mean, low, high = plots.mean_band(draws[:1])  # one run: no band
    np.testing.assert_array_equal(low, mean)
    np.testing.assert_array_equal(high, mean)


def test_client_quantiles_and_cdf_pool_the_groups_runs(grid):
    (g, _) = plots.group_runs(plots.load_runs(grid))
    per_run = [[json.loads(x) for x in (d / "clients.jsonl").read_text().splitlines()]
               for d in grid[:3]]
    steps, q = plots.client_quantiles(g)
    assert steps.tolist() == list(EVALS) and q.shape == (5, 3)
    for j in range(3):
        pooled = np.concatenate([run[j]["eval_clients"]["accuracy"] for run in per_run])
        np.testing.assert_allclose(q[:, j], np.quantile(pooled, [0.1, 0.25, 0.5, 0.75, 0.9]))
    step, xs, frac = plots.client_cdf(g)
    last = np.concatenate([run[-1]["eval_clients"]["accuracy"] for run in per_run])
    assert step == 5 and xs.size == 24
    np.testing.assert_array_equal(xs, np.sort(last))
    # The empirical CDF: at each value (its last tie), the fraction of clients at or below.
    for x in np.unique(last):
        assert frac[xs == x].max() == pytest.approx(np.mean(last <= x))
    assert frac[-1] == 1


def test_sweep_directories_group_by_their_values_minus_the_seed(tmp_path):
    sweep = tmp_path / "sweep"
    entries = []
    for lr in (0.05, 0.1):
        for s in range(2):
            name = f"client_lr={lr},seed={s}"
            write_run(sweep / name, s, lr, config=False)
            entries.append({"name": name, "values": {"client_lr": lr, "seed": s}})
    (sweep / "sweep.json").write_text(json.dumps({"grid": {"client_lr": [0.05, 0.1]},
                                                  "seeds": [0, 1], "runs": entries}))
    groups = plots.group_runs(plots.load_runs([sweep]))  # the sweep stands for its runs
    assert [g.label for g in groups] == ["client_lr=0.05", "client_lr=0.1"]
    assert [len(g.runs) for g in groups] == [2, 2]
    # Its runs named one by one find their values in the sweep.json above them.
    one_by_one = plots.group_runs(plots.load_runs([sweep / e["name"] for e in entries]))
    assert [g.label for g in one_by_one] == ["client_lr=0.05", "client_lr=0.1"]


def test_runs_without_config_or_sweep_stand_alone(tmp_path):
    a = write_run(tmp_path / "fedavg", 0, 0.1, config=False)
    b = write_run(tmp_path / "fedprox", 0, 0.1, config=False)
    groups = plots.group_runs(plots.load_runs([a, b]))
    assert [(g.label, len(g.runs)) for g in groups] == [("fedavg", 1), ("fedprox", 1)]


def test_curves_figure_has_a_panel_per_metric_and_a_line_and_band_per_group(grid):
    from matplotlib.collections import PolyCollection

    groups = plots.group_runs(plots.load_runs(grid))
    fig = plots.curves_figure(groups, ["train_loss", "eval.accuracy"])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["train_loss", "eval.accuracy"]
    for ax, metric in zip(axes, ["train_loss", "eval.accuracy"], strict=True):
        assert ax.get_xlabel() == "round"
        assert len(ax.lines) == 2
        assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2
        for line, g in zip(ax.lines, groups, strict=True):
            xs, mean, _, _ = plots.group_curve(g, metric)
            np.testing.assert_allclose(line.get_xdata(), xs)
            np.testing.assert_allclose(line.get_ydata(), mean)
    (legend,) = fig.legends
    assert legend.get_title().get_text() == "mean and 95% CI over seeds"
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["learning_rate=0.05 (3 seeds)", "learning_rate=0.1 (3 seeds)"]
    clock = plots.curves_figure(groups, ["train_loss"], x="virtual_time")
    assert clock.axes[0].get_xlabel() == "virtual time (s)"
    assert clock.axes[0].lines[0].get_xdata()[-1] > ROUNDS * 10


def test_quantile_and_cdf_figures(tmp_path):
    from matplotlib.collections import PolyCollection

    runs = [write_run(tmp_path / f"s{s}", s, 0.1, personal=True) for s in range(2)]
    (g,) = plots.group_runs(plots.load_runs(runs))
    fig = plots.quantiles_figure([g])
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 4  # 2 bands x 2
    steps, q = plots.client_quantiles(g)
    global_median, own_median = ax.lines
    np.testing.assert_allclose(global_median.get_xdata(), steps)
    np.testing.assert_allclose(global_median.get_ydata(), q[2])
    _, q_own = plots.client_quantiles(g, evaluation="eval_personal_clients")
    np.testing.assert_allclose(own_median.get_ydata(), q_own[2])
    assert ax.get_ylabel() == "per-client accuracy"
    cdf = plots.cdf_figure([g])
    solid, dashed = cdf.axes[0].lines
    _, xs, frac = plots.client_cdf(g)
    np.testing.assert_allclose(solid.get_xdata(), np.concatenate([xs[:1], xs]))
    np.testing.assert_allclose(solid.get_ydata(), np.concatenate([[0], frac]))
    assert dashed.get_linestyle() == "--"
    assert cdf.axes[0].get_xlabel() == "per-client accuracy"


def test_fedbuff_runs_plot_over_aggregations(tmp_path):
    run = write_run(tmp_path / "fedbuff", 0, 0.1, config=False, step="aggregation")
    groups = plots.group_runs(plots.load_runs([run]))
    assert groups[0].runs[0].step == "aggregation"
    fig = plots.curves_figure(groups, ["train_loss"])
    assert fig.axes[0].get_xlabel() == "aggregation"
    assert plots.client_quantiles(groups[0])[0].tolist() == list(EVALS)


def test_bad_input_names_the_problem(tmp_path, grid, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"'.*empty' holds no history.jsonl: not a run "
                       r"directory"):
        plots.plot_runs([grid[0], empty], tmp_path / "out")
    with pytest.raises(ValueError, match=r"run directory '.*missing' does not exist"):
        plots.load_runs([tmp_path / "missing"])
    (empty / "history.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"history.jsonl' is empty: the run has no finished"):
        plots.load_runs([empty])
    with pytest.raises(ValueError, match=r"no run has the metric 'eval.acuracy' \(3 run\(s\)"
                       r".*closest: eval.accuracy"):
        plots.plot_runs(grid[:3], tmp_path / "out", metrics=["eval.acuracy"])
    with pytest.raises(ValueError, match=r"no run has the per-client metric 'acuracy' \(did "
                       r"you mean 'accuracy'\?\); clients.jsonl holds accuracy"):
        plots.plot_runs(grid, tmp_path / "out", client_metric="acuracy")
    with pytest.raises(ValueError, match=r"unknown picture format 'jpg': use png, svg, pdf"):
        plots.plot_runs(grid, tmp_path / "out", formats=("png", "jpg"))
    assert not (tmp_path / "out").exists()  # nothing drawn before the input was checked
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"the plots need matplotlib: pip install "
                       r"'fedjax_sim\[plot\]'"):
        plots.plot_runs(grid, tmp_path / "out")


def test_cli_plot_writes_png_and_svg(grid, tmp_path, capsys):
    out = tmp_path / "pictures"
    assert cli.main(["plot", *map(str, grid), "--out", str(out), "--format", "png,svg",
                     "--metrics", "train_loss,eval.loss"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(out / f"{n}.{f}") for f in ("png", "svg") for n in (
        "curves", "curves_virtual_time", "clients_accuracy", "clients_accuracy_cdf"))
    for p in map(Path, printed):
        data = p.read_bytes()
        assert data.startswith(b"\x89PNG") if p.suffix == ".png" else b"<svg" in data[:2000]
    # One directory: the pictures go beside it; without clients.jsonl, the curves only.
    alone = write_run(tmp_path / "alone", 0, 0.1, config=False)
    (alone / "clients.jsonl").unlink()
    assert cli.main(["plot", str(alone)]) == 0
    assert sorted(p.name for p in (alone / "plots").iterdir()) == ["curves.png"]
    with pytest.raises(SystemExit) as info:
        cli.main(["plot", str(tmp_path)])
    assert info.value.code == 2
    assert "holds no history.jsonl" in capsys.readouterr().err


def test_cli_run_with_sinks_then_plot_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["run", "--rounds", "4", "--num-clients", "20", "--cohort-size", "5",
                     "--eval-every", "2", "--no-progress", "--fine-tune-steps", "3",
                     "--chunk-size", "1", "--output-dir", str(run_dir),
                     "--sinks", "jsonl,csv"]) == 0
    assert f"records: {run_dir}/history.jsonl, {run_dir}/clients.jsonl" in \
        capsys.readouterr().out
    assert {"history.csv", "clients.csv", "clients.jsonl"} <= {p.name for p in run_dir.iterdir()}
    runs = plots.load_runs([run_dir])
    assert plots.default_metrics(runs) == ["train_loss", "eval.accuracy", "eval.loss",
                                           "eval_personal.accuracy", "eval_personal.loss"]
    (g,) = plots.group_runs(runs)
    assert g.label == "run"
    steps, q = plots.client_quantiles(g, evaluation="eval_personal_clients")
    assert steps.tolist() == [1, 3] and np.all((0 <= q) & (q <= 1))
    fig = plots.quantiles_figure([g])
    assert len(fig.axes[0].lines) == 2  # the global model's median and the fine-tuned one's
    with pytest.raises(SystemExit):
        cli.main(["run", "--sinks", "jsonl,tensorbord"])
    assert "unknown sink 'tensorbord' (did you mean 'tensorboard'?)" in capsys.readouterr().err
