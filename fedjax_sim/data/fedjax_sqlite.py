"""Reader and writer for FedJAX's SQLite files (e.g. FedJAX's `emnist` and `stackoverflow`).

One table, one row per client:
  federated_data(client_id BLOB PRIMARY KEY, data BLOB, num_examples INTEGER)
with `data = zlib(msgpack({feature: array}))`. Arrays are msgpack extension types: 1 for
numeric ndarrays as msgpack `(shape, dtype name, C-order bytes)`, 4 for arrays of bytes as
`(shape, flat list of bytes)`. Nothing is unpickled: object dtypes are refused.
"""

from __future__ import annotations

import os
import sqlite3
import zlib
from contextlib import closing
from pathlib import Path

import msgpack
import numpy as np

from fedjax_sim.data.federated import (
    Features,
    FederatedData,
    check_like_earlier,
    from_client_dict,
)
from fedjax_sim.data.tff_sqlite import open_readonly

_NDARRAY, _BYTES_NDARRAY = 1, 4


# -- reading ----------------------------------------------------------------------------------
def _ext_hook(code: int, payload: bytes) -> np.ndarray:
    if code == _NDARRAY:
        shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
        dtype = np.dtype(dtype_name.decode())
        if dtype.hasobject:
            raise ValueError(f"an array of dtype {dtype} (object arrays are not loaded)")
        return np.frombuffer(buffer, dtype=dtype).reshape(shape)
    if code == _BYTES_NDARRAY:
        shape, flat = msgpack.unpackb(payload, raw=True)
        if not all(isinstance(v, bytes) for v in flat):
            raise ValueError("a bytes array (extension 4) holding values that are not bytes")
        return np.array(flat, dtype=np.bytes_).reshape(shape)
    raise ValueError(f"msgpack extension type {code}; only 1 (ndarray) and 4 (bytes) are read")


def _decode_client(where: str, blob: bytes, num_examples: int) -> Features:
    try:
        columns = msgpack.unpackb(zlib.decompress(blob), ext_hook=_ext_hook, raw=False)
    except (zlib.error, ValueError, TypeError, msgpack.UnpackException) as e:
        raise ValueError(f"{where}: cannot decode the data blob: {e}") from e
    if not isinstance(columns, dict) or not all(
        isinstance(v, np.ndarray) for v in columns.values()
    ):
        raise ValueError(f"{where}: the data blob is not a dict of arrays")
    for name, column in columns.items():
        if column.ndim == 0 or len(column) != num_examples:
            raise ValueError(
                f"{where}: num_examples is {num_examples} but feature {name!r} has shape "
                f"{column.shape}"
            )
    return columns


def load_fedjax_sqlite(path: str | Path) -> FederatedData:
    """Reads a FedJAX SQLite file into memory, clients in file (rowid) order.

    Bytes arrays (FedJAX's object arrays of bytes, e.g. StackOverflow's tokens) become
    fixed-width numpy bytes (`S<n>`) columns, which drop trailing NUL bytes.

    Example:
      >>> train = load_fedjax_sqlite("emnist_train.sqlite")

    Args:
      path: the `.sqlite` file.

    Returns:
      The population.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: naming the file (and the client, where there is one) for a file that is not
        FedJAX SQLite or is corrupt, a blob that does not decode, num_examples that disagree
        with the arrays, or features that differ between clients in name, dtype or shape.
    """
    clients: dict[str, Features] = {}
    spec: dict = {}  # feature -> (dtype kind, example shape, dtype)
    with closing(open_readonly(path)) as conn:
        try:
            rows = conn.execute(
                "SELECT client_id, data, num_examples FROM federated_data ORDER BY rowid"
            )
            for client_id, blob, num_examples in rows:
                cid = client_id.decode() if isinstance(client_id, bytes) else str(client_id)
                where = f"{path}: client {cid!r}"
                columns = _decode_client(where, blob, num_examples)
                check_like_earlier(where, columns, spec)
                clients[cid] = columns
        except (sqlite3.DatabaseError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read as a FedJAX SQLite file ({e})") from e
    try:
        return from_client_dict(clients)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


# -- writing ----------------------------------------------------------------------------------
def _ext_default(value: object) -> msgpack.ExtType:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"cannot serialize {type(value).__name__}; features must be arrays")
    if value.dtype.kind in "SU":
        flat = [v.encode() if isinstance(v, str) else v for v in value.ravel().tolist()]
        payload = msgpack.packb((value.shape, flat), use_bin_type=True)
        return msgpack.ExtType(_BYTES_NDARRAY, payload)
    if value.dtype.hasobject:
        raise TypeError("cannot serialize an object array")
    payload = msgpack.packb((value.shape, value.dtype.name, value.tobytes("C")), use_bin_type=True)
    return msgpack.ExtType(_NDARRAY, payload)


def write_fedjax_sqlite(path: str | Path, data: FederatedData) -> Path:
    """Writes `data` as a FedJAX SQLite file, one row per client in `data`'s order.

    Text (numpy unicode) columns are written as UTF-8 bytes, as FedJAX stores text, so they
    read back as bytes. The file is written beside `path` and renamed into place, so a failed
    write leaves no partial file; an existing file at `path` is replaced.

    Args:
      path: the `.sqlite` file to write.
      data: the population.

    Returns:
      The path written.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"write_fedjax_sqlite writes one file; {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)

    def rows():
        for i, cid in enumerate(data.client_ids.tolist()):
            columns = {k: np.asarray(v) for k, v in data.client(i).items()}
            packed = msgpack.packb(columns, default=_ext_default, strict_types=True)
            yield str(cid).encode(), zlib.compress(packed), int(data.num_examples[i])

    try:
        with closing(sqlite3.connect(tmp)) as conn:
            conn.execute(
                "CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, "
                "data BLOB NOT NULL, num_examples INTEGER NOT NULL)"
            )
            conn.executemany("INSERT INTO federated_data VALUES (?, ?, ?)", rows())
            conn.commit()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
