"""Sinks: where a run's records go as it runs.

A sink is opened on a directory and the records a run holds so far (none for a new run, the
restored ones for a resumed run), then sees each round's record as it is made and is closed
at the end of the run. Opening makes the sink's files hold exactly those records, so a run
resumed from a checkpoint never leaves a round twice or loses one, whatever the stopped run
had written after its checkpoint (a resumed run repeats those rounds with the same bits).

    =============  =================================================================
    "jsonl"        `history.jsonl`, one object a round (per-client lists apart), and
                   `clients.jsonl`, one object an evaluation: {"round": r,
                   "eval_clients": {metric: [value per client]}, ...}
    "csv"          `history.csv`, one row a round, nested fields as dotted columns;
                   `clients.csv`, one row per evaluated client and evaluation
    "tensorboard"  `tensorboard/`: every number of a record a scalar at step r, each
                   evaluation's per-client metrics a histogram (tensorboardX)
    "wandb"        a Weights & Biases run: the same scalars and histograms
    =============  =================================================================

Example:
  >>> sim = fs.Simulation(algo, train, cohort_size=10, output_dir="runs/a",  # doctest: +SKIP
  ...                     sinks=("jsonl", "csv", fs.sinks.TensorBoard()))
"""

from __future__ import annotations

import abc
import csv
import difflib
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# A record's per-client lists: the round's trained clients, and each evaluation's clients.
PER_CLIENT = ("clients", "eval_clients", "eval_personal_clients")
EVALUATIONS = ("eval_clients", "eval_personal_clients")


def step_key(record: dict) -> str:
    """The record's step field: "round" (`fs.Simulation`) or "aggregation" (FedBuff)."""
    return "round" if "round" in record else "aggregation"


def history_line(record: dict) -> dict:
    """The record as history.jsonl keeps it: everything but the per-client lists."""
    return {k: v for k, v in record.items() if k not in PER_CLIENT}


def clients_line(record: dict) -> dict | None:
    """The record's per-client evaluation metrics as clients.jsonl keeps them (None when
    the round was not evaluated): `{"round": r, "eval_clients": {metric: [...]}, ...}`."""
    if "eval_clients" not in record:
        return None
    key = step_key(record)
    return {key: record[key], **{k: record[k] for k in EVALUATIONS if k in record}}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted names: `{"eval": {"loss": {"p50": x}}}` becomes
    `{"eval.loss.p50": x}`; other values (numbers, lists, strings) are leaves."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a record (per-client lists, strings and lists apart) by dotted name,
    the step field left out (it is the step)."""
    key = step_key(record)
    return {k: float(v) for k, v in flatten(history_line(record)).items()
            if k != key and isinstance(v, (int, float))}


def client_values(line: dict) -> Iterable[tuple[str, str, np.ndarray]]:
    """`(evaluation, metric, values)` for each numeric per-client metric of a clients line."""
    for evaluation in EVALUATIONS:
        for metric, values in line.get(evaluation, {}).items():
            if metric != "client_id":
                yield evaluation, metric, np.asarray(values, np.float64)


class Sink(abc.ABC):
    """Where a run's records go. Subclass it for a sink of your own.

    Attributes:
      name: the name `resolve` knows it by.
      files: what it writes into the run directory (files or folders), for the checks that
        keep an earlier run from being overwritten unawares.
    """

    name: str
    files: tuple[str, ...] = ()

    @abc.abstractmethod
    def open(self, directory: Path, history: Sequence[dict]) -> None:
        """Starts writing into `directory`, its files made to hold exactly `history` (the
        records so far: none for a new run, the restored ones for a resumed run)."""

    @abc.abstractmethod
    def write(self, record: dict) -> None:
        """Adds one round's record (its per-client evaluation metrics included); written
        through, so a run killed after it keeps it."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finishes writing; `open` may start again later."""


class JsonLines(Sink):
    """`history.jsonl` (a record a line, per-client lists apart) and `clients.jsonl` (each
    evaluation's per-client metrics). The default sink.

    Example:
      >>> fs.simulate(algo, train, rounds=5, output_dir="runs/a",  # doctest: +SKIP
      ...             sinks=[fs.sinks.JsonLines()])
    """

    name = "jsonl"
    files = ("history.jsonl", "clients.jsonl")

    def __init__(self):
        self._directory: Path | None = None

    def open(self, directory, history):
        self._directory = Path(directory)
        lines = [history_line(r) for r in history]
        _replace(self._directory / "history.jsonl", "".join(_json(x) for x in lines))
        evals = [x for x in map(clients_line, history) if x is not None]
        _replace(self._directory / "clients.jsonl", "".join(_json(x) for x in evals))

    def write(self, record):
        with open(self._directory / "history.jsonl", "a") as f:
            f.write(_json(history_line(record)))
        line = clients_line(record)
        if line is not None:
            with open(self._directory / "clients.jsonl", "a") as f:
                f.write(_json(line))

    def close(self):
        self._directory = None


class Csv(Sink):
    """`history.csv`: a row a round, nested fields as dotted columns ("eval.accuracy.p50"),
    lists as JSON; `clients.csv`: a row per client and evaluation (long form: the step,
    "evaluation" ("eval_clients" or "eval_personal_clients"), "client_id", then a column per
    metric). A column first seen late (the first evaluation's) rewrites the file with it.

    Example:
      >>> fs.simulate(algo, train, rounds=5, output_dir="runs/a",  # doctest: +SKIP
      ...             sinks=("jsonl", "csv"))
    """

    name = "csv"
    files = ("history.csv", "clients.csv")

    def __init__(self):
        self._history: _Table | None = None
        self._clients: _Table | None = None

    def open(self, directory, history):
        directory = Path(directory)
        self._history = _Table(directory / "history.csv")
        self._clients = _Table(directory / "clients.csv")
        self._history.reset([flatten(history_line(r)) for r in history])
        self._clients.reset([row for r in history for row in self._client_rows(r)])

    def write(self, record):
        self._history.add([flatten(history_line(record))])
        self._clients.add(self._client_rows(record))

    def close(self):
        self._history = self._clients = None

    @staticmethod
    def _client_rows(record: dict) -> list[dict]:
        line = clients_line(record)
        if line is None:
            return []
        key = step_key(record)
        rows = []
        for evaluation in EVALUATIONS:
            metrics = line.get(evaluation)
            if metrics is None:
                continue
            ids = metrics.get("client_id", range(len(next(iter(metrics.values()), []))))
            for i, client in enumerate(ids):
                rows.append({key: line[key], "evaluation": evaluation, "client_id": client,
                             **{m: v[i] for m, v in metrics.items() if m != "client_id"}})
        return rows


class TensorBoard(Sink):
    """Event files in `tensorboard/` (through tensorboardX; no TensorFlow): every number of
    a record a scalar at its round ("eval/accuracy/weighted_mean"), and at each evaluation
    every per-client metric a histogram ("eval_clients/accuracy"). `tensorboard --logdir
    RUN_DIR` shows them. Opening rewrites the event files from the history, so a resumed
    run's hold each round once.

    Args:
      subdirectory: the folder in the run directory the event files go to.

    Example:
      >>> fs.simulate(algo, train, rounds=5, output_dir="runs/a",  # doctest: +SKIP
      ...             sinks=("jsonl", "tensorboard"))
    """

    name = "tensorboard"
    files = ("tensorboard",)

    def __init__(self, subdirectory: str = "tensorboard"):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError("the tensorboard sink needs tensorboardX: pip install "
                              "'fedjax_sim[tensorboard]'") from e
        self._writer_class = SummaryWriter
        self.subdirectory = subdirectory
        self.files = (subdirectory,)
        self._writer = None

    def open(self, directory, history):
        logdir = Path(directory) / self.subdirectory
        logdir.mkdir(parents=True, exist_ok=True)
        for old in logdir.glob("events.out.tfevents.*"):
            old.unlink()
        self._writer = self._writer_class(str(logdir))
        for record in history:
            self._add(record)
        self._writer.flush()

    def write(self, record):
        self._add(record)
        self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _add(self, record: dict) -> None:
        step = int(record[step_key(record)])
        for name, value in scalars(record).items():
            self._writer.add_scalar(name.replace(".", "/"), value, step)
        line = clients_line(record)
        for evaluation, metric, values in client_values(line or {}):
            finite = values[np.isfinite(values)]  # a histogram's range must be finite
            if finite.size:
                self._writer.add_histogram(f"{evaluation}/{metric}", finite, step)


class WandB(Sink):
    """A Weights & Biases run (`pip install 'fedjax_sim[wandb]'`): every number of a record
    logged at its round, each evaluation's per-client metrics as histograms. The run's id is
    kept in `wandb_run_id` in the run directory, so a resumed simulation resumes the same
    W&B run; W&B keeps the rounds it already has (a resumed run repeats them with the same
    bits). `WANDB_MODE=offline` (or "disabled") runs without a network.

    Args:
      project: the W&B project, as `wandb.init` takes it.
      entity: the W&B entity (user or team).
      name: the run's display name.
      config: the hyperparameters shown with the run.
      **init_kwargs: anything else `wandb.init` takes (tags, group, mode, ...).

    Example:
      >>> fs.simulate(algo, train, rounds=5, output_dir="runs/a",  # doctest: +SKIP
      ...             sinks=("jsonl", fs.sinks.WandB(project="fl", config={"lr": 0.1})))
    """

    name = "wandb"
    files = ("wandb", "wandb_run_id")

    def __init__(self, project: str | None = None, *, entity: str | None = None,
                 name: str | None = None, config: dict | None = None, **init_kwargs: Any):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("the wandb sink needs wandb (Weights & Biases): pip install "
                              "'fedjax_sim[wandb]'") from e
        self._wandb = wandb
        self._init = dict(project=project, entity=entity, name=name, config=config,
                          **init_kwargs)
        self._run = None

    def open(self, directory, history):
        directory = Path(directory)
        id_file = directory / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self._run = self._wandb.init(dir=str(directory), id=run_id, resume="allow",
                                     **self._init)
        # W&B refuses steps below its run's; a resumed run's are there already, same bits.
        start = int(getattr(self._run, "step", 0) or 0)
        for record in history:
            if record[step_key(record)] >= start:
                self.write(record)

    def write(self, record):
        data = {name.replace(".", "/"): value for name, value in scalars(record).items()}
        for evaluation, metric, values in client_values(clients_line(record) or {}):
            finite = values[np.isfinite(values)]
            if finite.size:
                data[f"{evaluation}/{metric}"] = self._wandb.Histogram(finite)
        self._run.log(data, step=int(record[step_key(record)]))

    def close(self):
        if self._run is not None:
            self._run.finish()
            self._run = None


SINKS = {"jsonl": JsonLines, "csv": Csv, "tensorboard": TensorBoard, "wandb": WandB}


def names(text: str) -> tuple[str, ...]:
    """The sink names of a comma-separated list, each checked (the closest suggested).

    Example:
      >>> names("jsonl, csv")
      ('jsonl', 'csv')
    """
    return tuple(_known(s.strip()) for s in text.split(",") if s.strip())


def _known(name: str) -> str:
    if name not in SINKS:
        close = difflib.get_close_matches(name, SINKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown sink {name!r}{hint}; the sinks are {', '.join(SINKS)}, "
                         "or a fs.sinks.Sink object")
    return name


def resolve(sinks: str | Sequence[str | Sink] | None,
            output_dir: Path | None) -> tuple[Sink, ...]:
    """The sinks `sinks` names: names from `SINKS` (or one comma-separated string of them)
    and `Sink` objects; None is ("jsonl",) with an `output_dir` and none without. Checked
    before any compile: an unknown name (the closest suggested), a missing package, a sink
    given twice, sinks without an output_dir.

    Example:
      >>> [s.name for s in resolve("jsonl,csv", Path("runs/a"))]
      ['jsonl', 'csv']
    """
    if sinks is None:
        return () if output_dir is None else (JsonLines(),)
    if isinstance(sinks, str):
        sinks = names(sinks)
    if isinstance(sinks, Sink) or not isinstance(sinks, Iterable):
        raise TypeError(f"sinks must be a sequence of sink names ({', '.join(SINKS)}) or "
                        f"fs.sinks.Sink objects, got {type(sinks).__name__}")
    out = []
    for s in sinks:
        if isinstance(s, str):
            s = SINKS[_known(s)]()
        elif not isinstance(s, Sink):
            raise TypeError(f"a sink must be a name ({', '.join(SINKS)}) or a fs.sinks.Sink, "
                            f"got {type(s).__name__}")
        out.append(s)
    given = [s.name for s in out]
    twice = sorted({n for n in given if given.count(n) > 1})
    if twice:
        raise ValueError(f"sink {twice[0]!r} given twice: both would write the same files")
    if out and output_dir is None:
        raise ValueError(f"sinks {tuple(given)} write into the run directory: give "
                         "output_dir (or sinks=())")
    return tuple(out)


class Recorder:
    """A run's sinks on its directory: opened on the history so far, written a record at a
    time, closed at the end of each `run`; a write after that opens them again first.

    Example:
      >>> rec = Recorder(resolve(None, Path("runs/a")), Path("runs/a"))  # doctest: +SKIP
      >>> rec.open([]); rec.write(record, [record]); rec.close()  # doctest: +SKIP
    """

    def __init__(self, sinks: Sequence[Sink], directory: Path):
        self.sinks, self.directory = tuple(sinks), directory
        self._open = False

    def existing(self) -> list[str]:
        """The sinks' files already in the directory (an earlier run's, for a warning)."""
        return [f for s in self.sinks for f in s.files if (self.directory / f).exists()]

    def open(self, history: Sequence[dict]) -> None:
        for s in self.sinks:
            s.open(self.directory, history)
        self._open = True

    def write(self, record: dict, history: Sequence[dict]) -> None:
        """Writes `record`, the newest of the run's `history`."""
        if not self._open:
            self.open(history[:-1])
        for s in self.sinks:
            s.write(record)

    def close(self) -> None:
        if self._open:
            self._open = False
            for s in self.sinks:
                s.close()


class _Table:
    """A CSV file of rows whose columns grow: a row with a new column rewrites the file."""

    def __init__(self, path: Path):
        self.path, self.rows, self.columns = path, [], []

    def reset(self, rows: list[dict]) -> None:
        self.rows, self.columns = [], []
        self._grow(rows)
        self.rows = list(rows)
        self._rewrite()

    def add(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.rows.extend(rows)
        if self._grow(rows):
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerows(self._cells(r) for r in rows)

    def _grow(self, rows: list[dict]) -> bool:
        known = set(self.columns)
        new = [k for r in rows for k in r if k not in known and not known.add(k)]
        self.columns.extend(new)
        return bool(new)

    def _cells(self, row: dict) -> list:
        return [_cell(row.get(c)) for c in self.columns]

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            if self.columns:
                w.writerow(self.columns)
            w.writerows(self._cells(r) for r in self.rows)
        os.replace(tmp, self.path)


def _cell(value):
    """A CSV cell: numbers as Python prints them (floats round-trip exactly), lists as
    JSON, a missing value empty."""
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def _json(x: dict) -> str:
    return json.dumps(x) + "\n"


def _replace(path: Path, text: str) -> None:
    """Writes `path` whole through a temporary file: a kill leaves the old or the new."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
