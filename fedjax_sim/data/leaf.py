"""Loader for LEAF's JSON files (FEMNIST, Shakespeare, Sent140, Synthetic, ...).

A LEAF file is `{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...],
"y": [...]}}}`. LEAF writes a data set as many such files, each holding some of the users, so
several files merge into one population.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_sim.data.federated import (
    Features,
    FederatedData,
    check_like_earlier,
    from_client_dict,
)
from fedjax_sim.data.tff_sqlite import reshape_features


def load_leaf(
    paths_or_dir: str | Path | Sequence[str | Path],
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> FederatedData:
    """Reads LEAF JSON files into one population.

    Features "x" and "y": numeric x becomes float32; y becomes int32 when every label is a
    whole number (LEAF's Synthetic writes labels as 3.0) and float32 otherwise; text (the
    strings of Shakespeare or Sent140) becomes a numpy unicode array. Users come in file order,
    then in each file's "users" order; users with no examples are dropped with a warning.

    Example:
      >>> train = load_leaf("leaf/data/femnist/data/train", shapes={"x": (28, 28)})

    Args:
      paths_or_dir: a JSON file, a directory (its `*.json` files, in name order), or a list
        of files. Pass the train and test files of a split separately: a user in two files is
        an error.
      shapes: per-example shapes, e.g. {"x": (28, 28)} for FEMNIST's 784 pixels.

    Returns:
      The population.

    Raises:
      FileNotFoundError: a path that does not exist, or a directory with no JSON files.
      ValueError: naming the file (and the user, where there is one) for invalid JSON, a
        malformed LEAF structure, num_samples that disagree with x or y, or x or y whose
        examples differ in shape or type.
    """
    paths = _json_paths(paths_or_dir)
    clients: dict[str, Features] = {}
    file_of: dict[str, Path] = {}
    spec: dict = {}  # feature -> (dtype kind, example shape, dtype)
    for path in paths:
        for user, features in _read_file(path):
            if user in file_of:
                raise ValueError(
                    f"{path}: user {user!r} is also in {file_of[user]}; LEAF puts each user in "
                    "one file of a split (load train and test files separately)"
                )
            check_like_earlier(f"{path}: user {user!r}", features, spec)
            file_of[user], clients[user] = path, features
    source = paths[0] if len(paths) == 1 else f"{paths[0].parent} ({len(paths)} LEAF files)"
    try:
        data = from_client_dict(clients)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    y = data.features["y"]
    if y.dtype.kind == "f":
        whole = np.array_equal(y, np.round(y))
        data.features["y"] = y.astype(np.int32 if whole else np.float32)
    return reshape_features(source, data, shapes or {})


def _json_paths(paths_or_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(paths_or_dir, str | Path):
        root = Path(paths_or_dir)
        if root.is_dir():
            paths = sorted(root.glob("*.json"))
            if not paths:
                raise FileNotFoundError(f"{root}: no .json files in this directory")
            return paths
        paths = [root]
    else:
        paths = [Path(p) for p in paths_or_dir]
    if not paths:
        raise ValueError("load_leaf: no files given")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
    return paths


def _read_file(path: Path) -> list[tuple[str, Features]]:
    """(user, {"x", "y"}) for every user of one LEAF file, checked."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
        raise ValueError(f"{path}: not valid JSON, perhaps truncated ({e})") from e
    if not isinstance(doc, dict) or not {"users", "num_samples", "user_data"} <= doc.keys():
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(
            f"{path}: not a LEAF file: expected keys users, num_samples, user_data; got {keys}"
        )
    users, num_samples, user_data = doc["users"], doc["num_samples"], doc["user_data"]
    if len(users) != len(num_samples):
        raise ValueError(f"{path}: {len(users)} users but {len(num_samples)} num_samples entries")
    if len(set(users)) != len(users):
        dup = next(u for i, u in enumerate(users) if u in users[:i])
        raise ValueError(f"{path}: user {dup!r} is listed twice in users")
    if set(users) != user_data.keys():
        missing, extra = set(users) - user_data.keys(), user_data.keys() - set(users)
        raise ValueError(
            f"{path}: users and user_data disagree: users without user_data "
            f"{sorted(missing)[:5]}, user_data without users {sorted(extra)[:5]}"
        )
    out = []
    for user, n in zip(users, num_samples, strict=True):
        where = f"{path}: user {user!r}"
        record = user_data[user]
        if not (isinstance(record, dict) and all(isinstance(record.get(k), list) for k in "xy")):
            raise ValueError(f"{where}: user_data entry needs lists 'x' and 'y'")
        x, y = record["x"], record["y"]
        if not len(x) == len(y) == n:
            raise ValueError(
                f"{where}: num_samples says {n} examples but x has {len(x)} and y has {len(y)}"
            )
        # y stays float64 until every user is read: whole numbers everywhere make it int32.
        out.append(
            (
                str(user),
                {"x": _array(where, "x", x, np.float32), "y": _array(where, "y", y, np.float64)},
            )
        )
    return out


def _array(where: str, name: str, values: list, numeric: type) -> np.ndarray:
    """One user's feature as an array: unicode for text, `numeric` otherwise."""
    text = bool(values) and isinstance(_first_leaf(values), str)
    try:
        return np.asarray(values, dtype=np.str_ if text else numeric)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: feature {name!r}: {_why_not_array(values, e)}") from e


def _first_leaf(value: Any) -> Any:
    while isinstance(value, list) and value:
        value = value[0]
    return value


def _why_not_array(values: list, error: Exception) -> str:
    first = None
    for i, v in enumerate(values):
        try:
            shape = np.shape(v)
        except ValueError:
            return f"ragged: example {i} is itself nested lists of different lengths"
        first = shape if first is None else first
        if shape != first:
            return f"ragged: example {i} has shape {shape} but example 0 has shape {first}"
    return f"values are not all numbers or all strings ({error})"


