"""On-disk backings for `FederatedData`: memory-mapped `.npy` columns, and SQLite read per
cohort.

A `FederatedData` column only needs numpy-style row indexing (`column[rows]`), `shape`, `dtype`
and `nbytes`. A memory-mapped `.npy` file is such a column already; `SqliteColumn` is one whose
rows live in a SQLite file, one compressed blob per client, read only for the clients a cohort
needs. Either way, populations larger than memory train with `simulate(..., resident=False)`:
each round reads just its cohort's rows.
"""

from __future__ import annotations

import collections
import io
import json
import sqlite3
import threading
import zlib
from pathlib import Path

import numpy as np

from fedjax_sim.data.federated import FederatedData

_META = "meta.json"


def save_npy(data: FederatedData, directory: str | Path) -> Path:
    """Writes `data` as one `.npy` file per column plus `client_ids.npy` and `offsets.npy`."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"save_npy writes a directory of .npy files; {directory} is a file")
    clash = {"client_ids", "offsets"} & set(data.features)
    if clash:
        raise ValueError(f"save_npy: feature name(s) {sorted(clash)} would overwrite the "
                         "population's own file of that name: rename the feature")
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "client_ids.npy", data.client_ids.astype(str))
    np.save(directory / "offsets.npy", data.offsets)
    for name, column in data.features.items():
        np.save(directory / f"{name}.npy", np.asarray(column))
    (directory / _META).write_text(json.dumps({"features": sorted(data.features)}))
    return directory


def load_npy(directory: str | Path, *, mmap: bool = True) -> FederatedData:
    """Reads a population written by `save_npy`; with `mmap`, columns stay on disk and only the
    rows a round touches are read."""
    directory = Path(directory)
    meta_path = directory / _META
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory}: no {_META}; not a directory written by save_npy")
    try:
        names = json.loads(meta_path.read_text())["features"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{meta_path}: corrupt metadata ({e})") from e
    mode = "r" if mmap else None

    def load(name):
        path = directory / f"{name}.npy"
        try:
            return np.load(path, mmap_mode=mode, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read column {name!r}: {e}") from e

    client_ids, offsets = load("client_ids"), np.asarray(load("offsets"))
    features = {name: load(name) for name in names}
    _check_layout(directory, client_ids, offsets, features)
    return FederatedData(np.asarray(client_ids), features, offsets)


def _check_layout(where, client_ids, offsets, features) -> None:
    if offsets.ndim != 1 or len(offsets) != len(client_ids) + 1 or offsets[0] != 0:
        raise ValueError(f"{where}: offsets do not match {len(client_ids)} clients")
    if np.any(np.diff(offsets) < 0):
        raise ValueError(f"{where}: offsets are not non-decreasing")
    for name, column in features.items():
        if column.shape[0] != offsets[-1]:
            raise ValueError(f"{where}: column {name!r} has {column.shape[0]} rows, the offsets "
                             f"say {int(offsets[-1])}")


# -- SQLite ---------------------------------------------------------------------------------
def save_sqlite(data: FederatedData, path: str | Path, *, batch_clients: int = 1024) -> Path:
    """Writes `data` to a SQLite file: one zlib-compressed `.npz` blob per client."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"save_sqlite writes one file; {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    con = sqlite3.connect(path)
    try:
        con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        con.execute("CREATE TABLE clients (idx INTEGER PRIMARY KEY, client_id TEXT, "
                    "num_examples INTEGER, data BLOB)")
        columns = {k: {"dtype": np.asarray(v[:0]).dtype.str, "shape": list(v.shape[1:])}
                   for k, v in data.features.items()}
        con.execute("INSERT INTO meta VALUES ('columns', ?)", (json.dumps(columns),))
        for lo in range(0, data.num_clients, batch_clients):
            rows = []
            for i in range(lo, min(lo + batch_clients, data.num_clients)):
                buf = io.BytesIO()
                np.savez(buf, **{k: np.asarray(v) for k, v in data.client(i).items()})
                rows.append((i, str(data.client_ids[i]), int(data.num_examples[i]),
                             zlib.compress(buf.getvalue(), 1)))
            con.executemany("INSERT INTO clients VALUES (?, ?, ?, ?)", rows)
        con.commit()
    finally:
        con.close()
    return path


class _SqliteStore:
    """Decoded clients of one SQLite file, with a small LRU cache (the columns of one cohort
    are read one after another: the clients are decoded once)."""

    def __init__(self, path: Path, offsets: np.ndarray, cache_clients: int):
        self.path, self.offsets, self.cache_clients = path, offsets, cache_clients
        self.con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self.lock = threading.Lock()  # the prefetch thread reads too
        self.cache: collections.OrderedDict[int, dict] = collections.OrderedDict()

    def clients(self, indices: np.ndarray) -> dict[int, dict]:
        with self.lock:
            missing = [int(i) for i in indices if int(i) not in self.cache]
            for lo in range(0, len(missing), 500):
                part = missing[lo:lo + 500]
                query = (f"SELECT idx, data FROM clients WHERE idx IN "
                         f"({','.join('?' * len(part))})")
                for idx, blob in self.con.execute(query, part):
                    self.cache[idx] = self._decode(idx, blob)
            out = {}
            for i in indices:
                i = int(i)
                if i not in self.cache:
                    raise ValueError(f"{self.path}: client #{i} is missing from the file")
                self.cache.move_to_end(i)
                out[i] = self.cache[i]
            while len(self.cache) > max(self.cache_clients, len(indices)):
                self.cache.popitem(last=False)
            return out

    def _decode(self, idx: int, blob: bytes) -> dict:
        try:
            with np.load(io.BytesIO(zlib.decompress(blob)), allow_pickle=False) as z:
                client = {k: z[k] for k in z.files}
        except (zlib.error, ValueError, OSError) as e:
            raise ValueError(f"{self.path}: client #{idx} has a corrupt data blob ({e})") from e
        n = int(self.offsets[idx + 1] - self.offsets[idx])
        for k, v in client.items():
            if len(v) != n:
                raise ValueError(f"{self.path}: client #{idx} column {k!r} has {len(v)} rows, "
                                 f"its num_examples is {n}")
        return client


class SqliteColumn:
    """One feature column of a SQLite-backed population: `column[rows]` reads those rows'
    clients from the file (numpy-style indexing with an integer array or a slice)."""

    def __init__(self, store: _SqliteStore, name: str, dtype: np.dtype, shape: tuple):
        self._store, self.name = store, name
        self.dtype = np.dtype(dtype)
        self.shape = (int(store.offsets[-1]), *shape)
        self.ndim = len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        rows = np.asarray(rows, np.int64)
        offsets = self._store.offsets
        owner = np.searchsorted(offsets, rows, side="right") - 1
        clients, inverse = np.unique(owner, return_inverse=True)
        decoded = self._store.clients(clients)
        if not len(clients):
            return np.zeros((0, *self.shape[1:]), self.dtype)
        stacked = np.concatenate([decoded[int(c)][self.name] for c in clients])
        counts = offsets[clients + 1] - offsets[clients]
        starts = np.cumsum(counts) - counts
        return stacked[starts[inverse] + rows - offsets[owner]]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def load_sqlite(path: str | Path, *, cache_clients: int = 4096) -> FederatedData:
    """Opens a population written by `save_sqlite`; rows are read per cohort, on demand."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            columns = json.loads(con.execute(
                "SELECT value FROM meta WHERE key = 'columns'").fetchone()[0])
            rows = con.execute(
                "SELECT client_id, num_examples FROM clients ORDER BY idx").fetchall()
        finally:
            con.close()
    except (sqlite3.DatabaseError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a population written by save_sqlite ({e})") from e
    if not rows:
        raise ValueError(f"{path}: the file holds no clients")
    ids = [cid for cid, _ in rows]
    offsets = np.concatenate([[0], np.cumsum(np.array([n for _, n in rows], np.int64))])
    store = _SqliteStore(path, offsets, cache_clients)
    features = {k: SqliteColumn(store, k, c["dtype"], tuple(c["shape"]))
                for k, c in columns.items()}
    return FederatedData(np.asarray(ids), features, offsets)


def is_in_memory(data: FederatedData) -> bool:
    """Whether every column is an ordinary in-memory array (not memory-mapped or lazy)."""
    return all(type(v) is np.ndarray for v in data.features.values())


