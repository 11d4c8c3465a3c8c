"""Plots of run directories: curves, per-client distributions, seeds grouped into bands.

`fedjax-sim plot RUN_DIR [RUN_DIR ...]` reads each directory's history.jsonl and
clients.jsonl (the "jsonl" sink's files) and draws:

- `curves`: the training loss and the evaluation metrics over rounds, one line per group of
  runs (and `curves_virtual_time`, the same against the virtual clock, where a device model
  ran);
- `clients_accuracy`: the per-client metric over rounds as quantile bands (10-90th and
  25-75th percentiles, the median a line), one panel per group;
- `clients_accuracy_cdf`: its distribution over clients at the last evaluation.

Runs that differ only in their seed form one group, drawn as the mean over its runs with a
95% confidence band for that mean (Student's t over the runs): runs with a config.toml
are grouped by it minus its run.seed, output.dir and run.chunk_size keys, runs of a sweep
(a directory with sweep.json) by their sweep.json values minus "seed", and any other run
stands alone. A sweep directory given as a RUN_DIR stands for all its runs.

Example:
  >>> paths = fs.plots.plot_runs(["runs/a", "runs/b"], out="plots")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_sim.sinks import EVALUATIONS, flatten

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
FORMATS = ("png", "svg", "pdf")
# Keys of a config or sweep entry that differ between seeds of one experiment (the chunk
# size changes no result, only the speed).
_UNGROUPED = ("seed", "run.seed", "output.dir", "run.chunk_size")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run directory as the plots read it.

    Attributes:
      directory: where it is.
      history: history.jsonl's records.
      clients: clients.jsonl's records (one per evaluation; empty without the file).
      config: config.toml, parsed (None without one).
      sweep_values: its entry's values in the sweep.json of the directory above (None
        outside a sweep).
    """

    directory: Path
    history: list[dict]
    clients: list[dict]
    config: dict | None = None
    sweep_values: dict | None = None

    @property
    def step(self) -> str:
        """The records' step field: "round", or "aggregation" for FedBuff."""
        return "round" if "round" in self.history[0] else "aggregation"


@dataclasses.dataclass(frozen=True)
class Group:
    """Runs that differ only in their seed, drawn as one line with a band.

    Attributes:
      label: what sets it apart from the other groups ("client_lr=0.03").
      runs: its runs.
    """

    label: str
    runs: tuple[Run, ...]


def load_run(directory: str | Path, sweep_values: dict | None = None) -> Run:
    """Reads a run directory; raises naming it when it holds no history.

    Example:
      >>> run = load_run("runs/synthetic")  # doctest: +SKIP
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"run directory {str(directory)!r} does not exist")
    path = directory / "history.jsonl"
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} holds no history.jsonl: not a run directory "
                         "(a run writes it with the 'jsonl' sink, the default)")
    history = _read_lines(path)
    if not history:
        raise ValueError(f"{str(path)!r} is empty: the run has no finished round")
    clients_path = directory / "clients.jsonl"
    clients = _read_lines(clients_path) if clients_path.is_file() else []
    config = None
    if (directory / "config.toml").is_file():
        with open(directory / "config.toml", "rb") as f:
            config = tomllib.load(f)
    return Run(directory, history, clients, config, sweep_values)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """The runs `paths` name: run directories, and sweep directories (with sweep.json)
    standing for all their runs.

    Example:
      >>> runs = load_runs(["runs/sweep"])  # doctest: +SKIP
    """
    if not paths:
        raise ValueError("give at least one run directory")
    runs = []
    for p in map(Path, paths):
        sweep = p / "sweep.json"
        if sweep.is_file() and not (p / "history.jsonl").exists():
            with open(sweep) as f:
                entries = json.load(f).get("runs", [])
            if not entries:
                raise ValueError(f"{str(sweep)!r} lists no runs")
            runs.extend(load_run(p / e["name"], dict(e.get("values", {}))) for e in entries)
        else:
            runs.append(load_run(p, _sweep_values(p)))
    return runs


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Groups the runs that differ only in their seed (see the module's docstring), in the
    order each group's first run comes.

    Example:
      >>> [g.label for g in group_runs(load_runs(["runs/sweep"]))]  # doctest: +SKIP
      ['client_lr=0.01', 'client_lr=0.03']
    """
    keys, values = [], []
    for run in runs:
        if run.config is not None:
            v = _without_seed(flatten(run.config))
            keys.append(("config", _frozen(v)))
        elif run.sweep_values is not None:
            v = _without_seed(run.sweep_values)
            keys.append(("sweep", _frozen(v)))
        else:
            v = None
            keys.append(("directory", str(run.directory.resolve())))
        values.append(v)
    order = list(dict.fromkeys(keys))
    members = {k: [r for r, rk in zip(runs, keys, strict=True) if rk == k] for k in order}
    first = {k: values[keys.index(k)] for k in order}
    # Labels name what differs between groups of the same kind.
    differing = set()
    for kind in ("config", "sweep"):
        of_kind = [first[k] for k in order if k[0] == kind]
        names = {n for v in of_kind for n in v}
        differing |= {(kind, n) for n in names
                      if len({json.dumps(v.get(n), sort_keys=True) for v in of_kind}) > 1}
    groups = []
    for k in order:
        v = first[k]
        parts = [f"{_short(n, v)}={_format(v[n])}" for kind, n in sorted(differing)
                 if kind == k[0] and n in v]
        label = ", ".join(parts) or _directory_label(members[k][0].directory)
        groups.append(Group(label, tuple(members[k])))
    return groups


def metric_values(run: Run, metric: str, x: str = "step") -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """`(steps, xs, values)` of a dotted metric ("eval.accuracy": its "weighted_mean") over
    the run's records that have it; `x` "step" or "virtual_time" (records without the
    clock left out).

    Example:
      >>> steps, xs, acc = metric_values(run, "eval.accuracy")  # doctest: +SKIP
    """
    steps, xs, ys = [], [], []
    for line in run.history:
        value = _lookup(line, metric)
        if value is None or (x == "virtual_time" and "virtual_time" not in line):
            continue
        steps.append(line[run.step])
        xs.append(line[run.step] if x == "step" else line["virtual_time"])
        ys.append(value)
    return np.asarray(steps), np.asarray(xs, np.float64), np.asarray(ys, np.float64)


def mean_band(values: np.ndarray, confidence: float = 0.95
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(mean, low, high)` over axis 0 (runs): the mean and its `confidence` interval,
    mean +- t(n - 1) s / sqrt(n) with s the runs' sample standard deviation; one run gives a
    band of zero width.

    Example:
      >>> m, lo, hi = mean_band(np.array([[1.0, 2.0], [3.0, 4.0]]))
      >>> m.tolist(), round(float(hi[0] - m[0]), 3)
      ([2.0, 3.0], 12.706)
    """
    values = np.asarray(values, np.float64)
    mean = values.mean(axis=0)
    n = values.shape[0]
    if n < 2:
        return mean, mean.copy(), mean.copy()
    from scipy import stats  # a dependency of jax's; imported late, for the CLI's start

    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * values.std(axis=0, ddof=1) / np.sqrt(n)
    return mean, mean - half, mean + half


def group_curve(group: Group, metric: str, x: str = "step"
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """`(xs, mean, low, high)` of `metric` over the steps every run of the group has (xs:
    the step, or the runs' mean virtual time at it); None when no run of it has the metric.

    Example:
      >>> xs, mean, lo, hi = group_curve(group, "train_loss")  # doctest: +SKIP
    """
    series = [metric_values(r, metric, x) for r in group.runs]
    series = [s for s in series if len(s[0])]
    if not series:
        return None
    common = sorted(set.intersection(*(set(s[0].tolist()) for s in series)))
    if not common:
        return None
    xs, ys = [], []
    for steps, x_values, values in series:
        at = {int(s): i for i, s in enumerate(steps.tolist())}
        idx = [at[s] for s in common]
        xs.append(x_values[idx])
        ys.append(values[idx])
    mean, low, high = mean_band(np.stack(ys))
    return np.mean(xs, axis=0), mean, low, high


def client_samples(group: Group, metric: str = "accuracy",
                   evaluation: str = "eval_clients") -> tuple[list[int], list[np.ndarray]]:
    """`(steps, values)`: at each evaluation every run of the group has, the per-client
    metric pooled over the group's runs (non-finite values left out).

    Example:
      >>> steps, values = client_samples(group, "accuracy")  # doctest: +SKIP
    """
    per_run = []
    for run in group.runs:
        key = run.step
        per_run.append({line[key]: np.asarray(line[evaluation][metric], np.float64)
                        for line in run.clients
                        if metric in line.get(evaluation, {})})
    if not per_run or not all(per_run):
        return [], []
    steps = sorted(set.intersection(*(set(d) for d in per_run)))
    values = []
    for s in steps:
        pooled = np.concatenate([d[s] for d in per_run])
        values.append(pooled[np.isfinite(pooled)])
    return steps, values


def client_quantiles(group: Group, metric: str = "accuracy",
                     evaluation: str = "eval_clients",
                     quantiles: Sequence[float] = QUANTILES) -> tuple[np.ndarray, np.ndarray]:
    """`(steps, q)`: the per-client metric's `quantiles` at each evaluation (q has a row
    per quantile), the group's runs pooled.

    Example:
      >>> steps, q = client_quantiles(group)  # doctest: +SKIP
    """
    steps, values = client_samples(group, metric, evaluation)
    if not steps:
        return np.zeros(0), np.zeros((len(quantiles), 0))
    q = np.stack([np.quantile(v, quantiles) if v.size else np.full(len(quantiles), np.nan)
                  for v in values], axis=1)
    return np.asarray(steps), q


def client_cdf(group: Group, metric: str = "accuracy", evaluation: str = "eval_clients"
               ) -> tuple[int, np.ndarray, np.ndarray] | None:
    """`(step, xs, fraction)` at the group's last evaluation: the sorted per-client values
    and the fraction of clients at or below each; None without an evaluation.

    Example:
      >>> step, xs, frac = client_cdf(group)  # doctest: +SKIP
    """
    steps, values = client_samples(group, metric, evaluation)
    if not steps or not values[-1].size:
        return None
    xs = np.sort(values[-1])
    return steps[-1], xs, np.arange(1, xs.size + 1) / xs.size


def default_metrics(runs: Sequence[Run]) -> list[str]:
    """The training loss and every metric of the evaluations ("eval.accuracy", and
    "eval_personal.accuracy" where clients have their own models) the runs record."""
    metrics = ["train_loss"]
    for evaluation in ("eval", "eval_personal"):
        names = {m for r in runs for line in r.history for m in line.get(evaluation, {})}
        metrics += [f"{evaluation}.{m}" for m in sorted(names)]
    return metrics


def check_metrics(runs: Sequence[Run], metrics: Sequence[str]) -> None:
    """Raises naming a metric no run has (with the closest the runs do have)."""
    have = _available(runs)
    for m in metrics:
        if not any(_lookup(line, m) is not None for r in runs for line in r.history):
            close = difflib.get_close_matches(m, sorted(have), n=3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ValueError(f"no run has the metric {m!r} ({len(runs)} run(s): "
                             f"{', '.join(str(r.directory) for r in runs)[:300]}){hint}; "
                             f"their metrics: {', '.join(sorted(have))[:600]}")


def check_client_metric(runs: Sequence[Run], metric: str) -> bool:
    """Whether any run has per-client evaluations; raises naming `metric` when they do but
    none of them has it."""
    have = {m for r in runs for line in r.clients for e in EVALUATIONS
            for m in line.get(e, {}) if m != "client_id"}
    if not have:
        return False
    if metric not in have:
        close = difflib.get_close_matches(metric, sorted(have), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"no run has the per-client metric {metric!r}{hint}; clients.jsonl "
                         f"holds {', '.join(sorted(have))}")
    return True


def curves_figure(groups: Sequence[Group], metrics: Sequence[str], x: str = "step"):
    """A panel per metric, a line per group (its mean, with the band when it has several
    runs), over the step or the virtual clock (`x="virtual_time"`).

    Example:
      >>> fig = curves_figure(group_runs(runs), ["train_loss", "eval.accuracy"])  # doctest: +SKIP
    """
    figure = _figure_class()
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig = figure(figsize=(4.6 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    step = _step_label(groups)
    for ax, metric in zip(axes, metrics, strict=False):
        for i, g in enumerate(groups):
            curve = group_curve(g, metric, x)
            if curve is None:
                continue
            xs, mean, low, high = curve
            ax.plot(xs, mean, color=f"C{i % 10}", label=_legend(g))
            if len(g.runs) > 1:
                ax.fill_between(xs, low, high, color=f"C{i % 10}", alpha=0.25, linewidth=0)
        ax.set_title(metric)
        ax.set_xlabel("virtual time (s)" if x == "virtual_time" else step)
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    title = "mean and 95% CI over seeds" if any(len(g.runs) > 1 for g in groups) else None
    _legend_below(fig, axes[0], title)
    return fig


def quantiles_figure(groups: Sequence[Group], metric: str = "accuracy"):
    """A panel per group: the per-client metric's 10-90th and 25-75th percentile bands and
    median over evaluations (the personal models' beside the global one's, where there are).

    Example:
      >>> fig = quantiles_figure(group_runs(runs))  # doctest: +SKIP
    """
    figure = _figure_class()
    from matplotlib.colors import to_rgba

    cols = min(3, len(groups))
    rows = -(-len(groups) // cols)
    fig = figure(figsize=(4.6 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    step = _step_label(groups)
    for ax, g in zip(axes, groups, strict=False):
        for color, evaluation in zip(("C0", "C1"), EVALUATIONS, strict=True):
            steps, q = client_quantiles(g, metric, evaluation)
            if not len(steps):
                continue
            what = "global model" if evaluation == "eval_clients" else "own models"
            # Edges drawn opaque: where two models' bands overlap, each keeps its outline.
            edge = to_rgba(color, 0.9)
            ax.fill_between(steps, q[0], q[4], facecolor=to_rgba(color, 0.15), edgecolor=edge,
                            linewidth=0.6, label=f"{what}: 10-90th pct")
            ax.fill_between(steps, q[1], q[3], facecolor=to_rgba(color, 0.35), edgecolor=edge,
                            linewidth=0.6, label=f"{what}: 25-75th pct")
            ax.plot(steps, q[2], color=color, label=f"{what}: median")
        ax.set_title(_legend(g), fontsize="medium")
        ax.set_xlabel(step)
        ax.set_ylabel(f"per-client {metric}")
        ax.grid(alpha=0.3)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    _legend_below(fig, axes[0])
    return fig


def cdf_figure(groups: Sequence[Group], metric: str = "accuracy"):
    """The per-client metric's distribution over clients at each group's last evaluation, a
    line per group (dashed: the clients' own models, where there are).

    Example:
      >>> fig = cdf_figure(group_runs(runs))  # doctest: +SKIP
    """
    figure = _figure_class()
    fig = figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.subplots()
    for i, g in enumerate(groups):
        for style, evaluation in zip(("-", "--"), EVALUATIONS, strict=True):
            cdf = client_cdf(g, metric, evaluation)
            if cdf is None:
                continue
            step, xs, frac = cdf
            own = "global model" if evaluation == "eval_clients" else "own models"
            # From 0 below the smallest value: the steps then rise by each client's share.
            ax.step(np.concatenate([xs[:1], xs]), np.concatenate([[0.0], frac]), where="post",
                    linestyle=style, color=f"C{i % 10}",
                    label=f"{_legend(g)}: {own}, {g.runs[0].step} {step}")
    ax.set_title(f"per-client {metric} at the last evaluation", fontsize="medium")
    ax.set_xlabel(f"per-client {metric}")
    ax.set_ylabel("fraction of clients at or below")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, ncols=1)
    return fig


def plot_runs(paths: Sequence[str | Path], out: str | Path, formats: Sequence[str] = ("png",),
              metrics: Sequence[str] | None = None,
              client_metric: str = "accuracy") -> list[Path]:
    """Draws the runs at `paths` into `out` (see the module's docstring); returns the files.

    Args:
      paths: run directories, or sweep directories.
      out: the folder the pictures go to (created).
      formats: "png", "svg", "pdf".
      metrics: dotted names of history fields ("train_loss", "eval.accuracy",
        "eval.loss.p10", "epsilon"); default `default_metrics`.
      client_metric: the per-client metric of the distribution plots.

    Example:
      >>> fs.plots.plot_runs(["runs/a"], "runs/a/plots", ("png", "svg"))  # doctest: +SKIP
    """
    formats = _check_formats(formats)
    runs = load_runs(paths)
    metrics = default_metrics(runs) if metrics is None else list(metrics)
    check_metrics(runs, metrics)
    has_clients = check_client_metric(runs, client_metric)
    groups = group_runs(runs)
    figures = {"curves": curves_figure(groups, metrics)}
    if any("virtual_time" in line for r in runs for line in r.history):
        figures["curves_virtual_time"] = curves_figure(groups, metrics, x="virtual_time")
    if has_clients:
        figures[f"clients_{client_metric}"] = quantiles_figure(groups, client_metric)
        figures[f"clients_{client_metric}_cdf"] = cdf_figure(groups, client_metric)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            fig.savefig(path, dpi=120)
            written.append(path)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `fedjax-sim plot` arguments."""
    add = parser.add_argument
    add("run_dirs", nargs="+", metavar="RUN_DIR",
        help="run directories (or sweep directories, standing for all their runs)")
    add("--out", default=None,
        help="where the pictures go (default: RUN_DIR/plots for one directory, else plots)")
    add("--format", default="png", help=f"comma-separated, of {', '.join(FORMATS)}")
    add("--metrics", default=None,
        help="comma-separated dotted history fields (default: train_loss and every "
        "evaluation metric), e.g. train_loss,eval.accuracy,eval.accuracy.p10,epsilon")
    add("--client-metric", default="accuracy",
        help="the per-client metric of the distribution plots")


def main(args: argparse.Namespace) -> list[Path]:
    """`fedjax-sim plot`: draws, prints and returns the files written."""
    out = args.out or (Path(args.run_dirs[0]) / "plots" if len(args.run_dirs) == 1
                       else Path("plots"))
    metrics = None if args.metrics is None else _split(args.metrics)
    written = plot_runs(args.run_dirs, out, _split(args.format), metrics, args.client_metric)
    for path in written:
        print(path)
    return written


def _figure_class():
    """matplotlib's Figure (no pyplot: no global state, no display needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the plots need matplotlib: pip install 'fedjax_sim[plot]'") from e
    return Figure


def _read_lines(path: Path) -> list[dict]:
    out = []
    with open(path) as f:
        for i, text in enumerate(f):
            if not text.strip():
                continue
            try:
                out.append(json.loads(text))
            except json.JSONDecodeError as e:
                # A run killed mid-write leaves a partial last line; anything else is damage.
                if text.endswith("\n"):
                    raise ValueError(f"{str(path)!r} line {i + 1} is not JSON: {e}") from e
    return out


def _sweep_values(directory: Path) -> dict | None:
    """The directory's values in the sweep.json above it (None outside a sweep)."""
    sweep = directory.parent / "sweep.json"
    if not sweep.is_file():
        return None
    with open(sweep) as f:
        for entry in json.load(f).get("runs", []):
            if entry.get("name") == directory.name:
                return dict(entry.get("values", {}))
    return None


def _without_seed(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in _UNGROUPED}


def _frozen(values: dict) -> str:
    return json.dumps(values, sort_keys=True, default=str)


def _short(name: str, values: dict) -> str:
    """A dotted name's last part, unless another key shares it."""
    last = name.split(".")[-1]
    return last if sum(k.split(".")[-1] == last for k in values) == 1 else name


def _format(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _directory_label(directory: Path) -> str:
    """A run's directory name, a sweep's "seed=N" part left out."""
    parts = [p for p in directory.name.split(",") if not p.startswith("seed=")]
    return ",".join(parts) or directory.parent.name or directory.name


def _legend(group: Group) -> str:
    n = len(group.runs)
    return group.label if n == 1 else f"{group.label} ({n} seeds)"


def _legend_below(fig, ax, title: str | None = None, ncols: int = 3) -> None:
    """One legend for the figure, under its panels (never over the data)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", fontsize="small",
                   ncols=min(ncols, len(handles)), title=title, title_fontsize="small")


def _step_label(groups: Sequence[Group]) -> str:
    steps = {r.step for g in groups for r in g.runs}
    return "aggregation" if steps == {"aggregation"} else "round"


def _lookup(line: dict, metric: str) -> float | None:
    """A dotted metric's number in a record: the field, or a summary's "weighted_mean"."""
    value: Any = line
    for part in metric.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, dict):
        value = value.get("weighted_mean")
    return float(value) if isinstance(value, (int, float)) else None


def _available(runs: Sequence[Run]) -> set[str]:
    """The metrics `_lookup` finds in the runs (a summary by its name)."""
    have = set()
    for r in runs:
        for line in r.history[:1] + r.history[-1:] + [x for x in r.history if "eval" in x][:1]:
            for k, v in flatten(line).items():
                if isinstance(v, (int, float)) and k != r.step:
                    have.add(k.removesuffix(".weighted_mean"))
    return have


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"unknown picture format {bad[0] if bad else ''!r}: use "
                         f"{', '.join(FORMATS)}")
    return formats


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]
