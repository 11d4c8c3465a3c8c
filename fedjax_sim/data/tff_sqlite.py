"""Loader for TensorFlow Federated's SQLite files (`emnist_all.sqlite`, `shakespeare.sqlite`,
`stackoverflow.sqlite`, `cifar100.sqlite`, ...), without TensorFlow.

The files hold two tables:
  examples(split_name TEXT, client_id TEXT, serialized_example_proto BLOB)
  client_metadata(client_id TEXT, split_name TEXT, num_examples INTEGER)
and every BLOB is a serialized `tf.train.Example`, decoded by `tf_example.parse_example`.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from pathlib import Path

import numpy as np

from fedjax_sim.data.federated import Features, FederatedData, from_client_dict
from fedjax_sim.data.tf_example import FeatureValue, parse_example

Decoder = Callable[[bytes], Mapping[str, FeatureValue]]


def open_readonly(path: str | Path) -> sqlite3.Connection:
    """Opens an existing SQLite file read-only (a plain `connect` would create a missing one)."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.sqlite"))[:5]
        raise IsADirectoryError(f"{path} is a directory; pass the SQLite file itself"
                                + (f" (this directory holds {inside})" if inside else ""))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def load_tff_sqlite(
    path: str | Path,
    split: str,
    *,
    features: Sequence[str] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    decode: Decoder = parse_example,
) -> FederatedData:
    """Reads one split of a TFF SQLite file into memory.

    Clients come in `client_id` order, each client's examples in file order. A feature that
    holds one value per example becomes a column of shape [N]; one that holds k values, [N, k]
    (reshape with `shapes`). Numeric lists must have the same length in every example. Bytes
    features become fixed-width numpy bytes (`S<n>`) columns, which drop trailing NUL bytes;
    floats are float32 and ints int64, as in the protos.

    Example:
      >>> train = load_tff_sqlite("emnist_all.sqlite", "train", shapes={"pixels": (28, 28)})

    Args:
      path: the `.sqlite` file.
      split: the split to read (e.g. "train" or "test").
      features: the features to read; by default all, which every example must then share.
      shapes: per-example shapes, e.g. {"pixels": (28, 28)} for EMNIST's 784 floats.
      decode: turns one serialized proto into {feature: values}; the default needs neither
        TensorFlow nor protobuf.

    Returns:
      The split's population.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: naming the file (and the client, where there is one) for an unknown split, a
        file that is not TFF SQLite or is corrupt, an undecodable proto, a missing feature,
        or a numeric feature whose length varies.
    """
    with closing(open_readonly(path)) as conn:
        try:
            counts = _split_counts(path, conn, split)
            clients = _read_clients(path, conn, split, counts, features, decode)
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{path}: cannot read as a TFF SQLite file ({e})") from e
    try:
        data = from_client_dict(clients)
    except ValueError as e:
        raise ValueError(f"{path}, split {split!r}: {e}") from e
    return reshape_features(path, data, shapes or {})


def _split_counts(path: str | Path, conn: sqlite3.Connection, split: str) -> dict[str, int]:
    """{client: num_examples} from client_metadata; raises naming the splits there are."""
    rows = conn.execute("SELECT client_id, split_name, num_examples FROM client_metadata")
    counts, splits = {}, set()
    for client_id, split_name, num in rows:
        splits.add(split_name)
        if split_name == split and num:
            counts[client_id] = num
    if split not in splits:
        raise ValueError(f"{path}: unknown split {split!r}; the file has splits {sorted(splits)}")
    return counts


def _read_clients(
    path: str | Path,
    conn: sqlite3.Connection,
    split: str,
    counts: dict[str, int],
    features: Sequence[str] | None,
    decode: Decoder,
) -> dict[str, Features]:
    rows = conn.execute(
        "SELECT client_id, serialized_example_proto FROM examples WHERE split_name = ? "
        "ORDER BY client_id, rowid",
        (split,),
    )
    spec: dict[str, tuple[str, int]] = {}  # feature -> (kind, values per example), file-wide
    names = list(features) if features is not None else None
    clients = {}
    for client_id, group in itertools.groupby(rows, key=lambda row: row[0]):
        where = f"{path}: client {client_id!r}"
        examples = []
        for i, (_, blob) in enumerate(group):
            try:
                examples.append(decode(blob))
            except ValueError as e:
                raise ValueError(f"{where}, example {i}: cannot decode the proto ({e})") from e
        if names is None:
            names = sorted(examples[0])
        if len(examples) != counts.get(client_id, 0):
            raise ValueError(
                f"{where}: client_metadata lists {counts.get(client_id, 0)} examples but the "
                f"examples table has {len(examples)} (truncated or inconsistent file)"
            )
        clients[client_id] = _columns(where, examples, names, spec, exact=features is None)
    missing = counts.keys() - clients.keys()
    if missing:
        first = min(missing)
        raise ValueError(
            f"{path}: client {first!r}: client_metadata lists {counts[first]} examples but the "
            f"examples table has none ({len(missing)} such client(s); truncated file?)"
        )
    return clients


def _columns(
    where: str,
    examples: list[Mapping[str, FeatureValue]],
    names: list[str],
    spec: dict[str, tuple[str, int]],
    exact: bool,
) -> Features:
    """Stacks one client's decoded examples into columns, checking them against `spec`."""
    for i, ex in enumerate(examples):
        absent = [n for n in names if n not in ex]
        if absent or (exact and len(ex) != len(names)):
            raise ValueError(
                f"{where}, example {i}: has features {sorted(ex)}, expected {names}"
                + (f" (missing {absent})" if absent else "; pass features= to choose some")
            )
    out = {}
    for name in names:
        values = [ex[name] for ex in examples]
        for i, v in enumerate(values):
            got = ("bytes" if isinstance(v, list) else str(v.dtype), len(v))
            want = spec.setdefault(name, got)
            if got != want:
                raise ValueError(
                    f"{where}, example {i}: feature {name!r} holds {got[1]} {got[0]} value(s), "
                    f"but earlier examples hold {want[1]} {want[0]} value(s); a feature needs "
                    "the same type and length in every example"
                )
        kind, width = spec[name]
        if kind == "bytes":
            column = np.array([b for v in values for b in v], dtype=np.bytes_)
        else:
            column = np.concatenate(values)
        out[name] = column.reshape((len(values),) if width == 1 else (len(values), width))
    return out


def reshape_features(
    source: str | Path, data: FederatedData, shapes: Mapping[str, tuple[int, ...]]
) -> FederatedData:
    """`data` with the named features' examples reshaped (e.g. 784 floats to (28, 28))."""
    columns = dict(data.features)
    for name, shape in shapes.items():
        if name not in columns:
            raise ValueError(
                f"{source}: shapes names feature {name!r}; features: {sorted(columns)}"
            )
        column = columns[name]
        try:
            columns[name] = column.reshape((len(column), *shape))
        except ValueError as e:
            raise ValueError(
                f"{source}: feature {name!r} has per-example shape {column.shape[1:]}, which "
                f"cannot be reshaped to {tuple(shape)}"
            ) from e
    return FederatedData(data.client_ids, columns, data.offsets)
