"""Loaders for the public formats: tf.train.Example, TFF SQLite, FedJAX SQLite and LEAF JSON.

Small files are built in tmp_path; the real LEAF files in ../shared/data are read when present.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fedjax_sim.data import (
    from_client_dict,
    load_fedjax_sqlite,
    load_leaf,
    load_tff_sqlite,
    write_fedjax_sqlite,
)
from fedjax_sim.data.tf_example import DecodeError, encode_example, parse_example

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FEMNIST_RAW = SHARED / "femnist_leaf" / "raw"
FEDPROX = SHARED / "fedprox_synthetic"


# -- tf.train.Example -------------------------------------------------------------------------
# Example{features: {"y": Feature{int64_list: [-1]}}}, unpacked, spelled out byte by byte so the
# parser is checked against the wire format itself and not only against our own encoder.
_Y_MINUS_ONE = bytes.fromhex(
    "0a14"  # Example.features (field 1, 20 bytes)
    "0a12"  # Features.feature map entry (field 1, 18 bytes)
    "0a0179"  # entry key (field 1): "y"
    "120d"  # entry value (field 2): Feature, 13 bytes
    "1a0b"  # Feature.int64_list (field 3), 11 bytes
    "08ffffffffffffffffff01"  # Int64List.value (field 1, varint): -1 as 10-byte varint
)


def test_parse_example_reads_hand_encoded_bytes():
    assert parse_example(_Y_MINUS_ONE)["y"].tolist() == [-1]
    assert encode_example({"y": [-1]}, packed=False) == _Y_MINUS_ONE
    # A packed float list of 1.0 and -2.0 (little-endian float32), in a Feature that also holds
    # an unknown varint field 7, which must be skipped.
    float_list = bytes.fromhex("0a08") + bytes.fromhex("0000803f000000c0")
    feature = bytes.fromhex("3807") + bytes([0x12, len(float_list)]) + float_list
    entry = bytes.fromhex("0a0166") + bytes([0x12, len(feature)]) + feature
    features = bytes([0x0A, len(entry)]) + entry
    floats = bytes([0x0A, len(features)]) + features
    np.testing.assert_array_equal(parse_example(floats)["f"], [1.0, -2.0])


@pytest.mark.parametrize("packed", [True, False])
def test_example_round_trip(packed):
    big = np.array([-(2**63), -1, 0, 1, 2**40, 2**63 - 1], np.int64)
    features = {
        "pixels": np.linspace(-1, 1, 784, dtype=np.float32),
        "ids": big,
        "flag": True,
        "text": [b"trailing nul\x00", "caf\u00e9"],
        "empty": [],
    }
    out = parse_example(encode_example(features, packed=packed))
    assert out["pixels"].dtype == np.float32 and out["pixels"].shape == (784,)
    np.testing.assert_array_equal(out["pixels"], features["pixels"])
    assert out["ids"].dtype == np.int64
    np.testing.assert_array_equal(out["ids"], big)
    assert out["flag"].tolist() == [1]
    assert out["text"] == [b"trailing nul\x00", "caf\u00e9".encode()]
    assert out["empty"].size == 0


def test_example_truncated_or_corrupt_raises():
    blob = encode_example({"pixels": np.ones(10, np.float32)})
    with pytest.raises(DecodeError, match="truncated"):
        parse_example(blob[:-5])
    with pytest.raises(DecodeError, match="varint"):
        parse_example(b"\x0a\xff")  # A length whose varint never ends.


# -- TFF SQLite -------------------------------------------------------------------------------
def _write_tff(path, rows, metadata=None):
    """rows: (split, client, features, packed). metadata defaults to the rows' true counts."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE examples (split_name TEXT, client_id TEXT, serialized_example_proto BLOB)"
        )
        conn.execute(
            "CREATE TABLE client_metadata (client_id TEXT, split_name TEXT, num_examples INTEGER)"
        )
        for split, client, features, packed in rows:
            blob = (
                features if isinstance(features, bytes) else encode_example(features, packed=packed)
            )
            conn.execute("INSERT INTO examples VALUES (?, ?, ?)", (split, client, blob))
        if metadata is None:
            metadata = {}
            for split, client, _, _ in rows:
                metadata[client, split] = metadata.get((client, split), 0) + 1
        conn.executemany(
            "INSERT INTO client_metadata VALUES (?, ?, ?)",
            [(c, s, n) for (c, s), n in metadata.items()],
        )
    conn.close()
    return path


def _emnist_rows(clients=("f2", "f1"), per_client=3):
    rows = []
    for k in range(per_client):  # Interleaved, so the loader must group by client itself.
        for c, client in enumerate(clients):
            pixels = np.full(784, c + k / 10, np.float32)
            rows.append(("train", client, {"pixels": pixels, "label": c * 10 + k}, k % 2 == 0))
    rows.append(("test", "f1", {"pixels": np.zeros(784, np.float32), "label": 61}, True))
    return rows


def test_tff_sqlite_emnist_like(tmp_path):
    path = _write_tff(tmp_path / "emnist.sqlite", _emnist_rows())
    train = load_tff_sqlite(path, "train", shapes={"pixels": (28, 28)})
    assert train.client_ids.tolist() == ["f1", "f2"]  # client_id order
    assert train.num_examples.tolist() == [3, 3]
    assert train.features["pixels"].shape == (6, 28, 28)
    assert train.features["pixels"].dtype == np.float32
    assert train.features["label"].dtype == np.int64 and train.features["label"].shape == (6,)
    f2 = train.get_clients(["f2"])["f2"]
    assert f2["label"].tolist() == [0, 1, 2]  # file order within the client
    np.testing.assert_allclose(f2["pixels"][:, 0, 0], [0.0, 0.1, 0.2], rtol=1e-6)
    test = load_tff_sqlite(path, "test")
    assert test.client_ids.tolist() == ["f1"] and test.features["label"].tolist() == [61]
    assert test.features["pixels"].shape == (1, 784)


def test_tff_sqlite_bytes_and_int_lists(tmp_path):
    rows = [
        ("train", "hamlet", {"snippets": b"To be, or not", "ids": [-5, 0, 7]}, False),
        ("train", "hamlet", {"snippets": b"to be", "ids": [1, -(2**40), 3]}, True),
        ("train", "ophelia", {"snippets": "caf\u00e9", "ids": [9, 9, 9]}, True),
    ]
    path = _write_tff(tmp_path / "shakespeare.sqlite", rows)
    data = load_tff_sqlite(path, "train")
    snippets = data.features["snippets"]
    assert snippets.dtype == np.dtype("S13") and snippets.shape == (3,)
    assert snippets.tolist() == [b"To be, or not", b"to be", "caf\u00e9".encode()]
    assert data.features["ids"].shape == (3, 3)
    assert data.features["ids"][:2].tolist() == [[-5, 0, 7], [1, -(2**40), 3]]
    only = load_tff_sqlite(path, "train", features=["ids"])
    assert list(only.features) == ["ids"]


def test_tff_sqlite_unknown_split_lists_splits(tmp_path):
    path = _write_tff(tmp_path / "e.sqlite", _emnist_rows())
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*\['test', 'train'\]"):
        load_tff_sqlite(path, "validation")


def test_tff_sqlite_missing_file_is_not_created(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.sqlite"):
        load_tff_sqlite(tmp_path / "nope.sqlite", "train")
    assert not (tmp_path / "nope.sqlite").exists()


def test_tff_sqlite_not_sqlite_or_truncated(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match=r"junk\.sqlite.*not a database"):
        load_tff_sqlite(junk, "train")
    full = _write_tff(tmp_path / "full.sqlite", _emnist_rows(per_client=40))
    cut = tmp_path / "cut.sqlite"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.sqlite: .*(malformed|not a database)"):
        load_tff_sqlite(cut, "train")


def test_tff_sqlite_truncated_proto_names_client(tmp_path):
    blob = encode_example({"pixels": np.ones(784, np.float32), "label": 1})
    rows = _emnist_rows() + [("train", "f3", blob[:-10], True)]
    path = _write_tff(tmp_path / "e.sqlite", rows)
    with pytest.raises(ValueError, match=r"e\.sqlite: client 'f3', example 0: cannot decode"):
        load_tff_sqlite(path, "train")


def test_tff_sqlite_ragged_feature_names_client_and_feature(tmp_path):
    rows = _emnist_rows() + [
        ("train", "f3", {"pixels": np.ones(784, np.float32), "label": 1}, True),
        ("train", "f3", {"pixels": np.ones(783, np.float32), "label": 1}, True),
    ]
    path = _write_tff(tmp_path / "e.sqlite", rows)
    with pytest.raises(ValueError, match=r"client 'f3', example 1: feature 'pixels' holds 783"):
        load_tff_sqlite(path, "train")


def test_tff_sqlite_missing_feature_names_client(tmp_path):
    rows = _emnist_rows() + [("train", "f3", {"pixels": np.ones(784, np.float32)}, True)]
    path = _write_tff(tmp_path / "e.sqlite", rows)
    with pytest.raises(ValueError, match=r"client 'f3', example 0.*missing \['label'\]"):
        load_tff_sqlite(path, "train", features=["pixels", "label"])
    with pytest.raises(ValueError, match=r"client 'f3', example 0: has features \['pixels'\]"):
        load_tff_sqlite(path, "train")


def test_tff_sqlite_metadata_mismatch_names_client(tmp_path):
    rows = _emnist_rows()
    metadata = {("f1", "train"): 3, ("f2", "train"): 5, ("f1", "test"): 1}
    path = _write_tff(tmp_path / "e.sqlite", rows, metadata)
    with pytest.raises(ValueError, match=r"client 'f2': client_metadata lists 5 .* has 3"):
        load_tff_sqlite(path, "train")


def test_unknown_client_id_raises_key_error(tmp_path):
    data = load_tff_sqlite(_write_tff(tmp_path / "e.sqlite", _emnist_rows()), "train")
    with pytest.raises(KeyError, match="nope"):
        data.get_clients(["nope"])


# -- FedJAX SQLite ----------------------------------------------------------------------------
def test_fedjax_sqlite_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    clients = {
        "writer/1": {
            "x": rng.random((3, 2, 2), dtype=np.float32),
            "y": np.array([1, 2, 3], np.int32),
            "tokens": np.array([b"a b", b"c", b"trail\x00x"]),
            "text": np.array(["h\u00e9", "b", "c"]),
        },
        "writer/0": {
            "x": rng.random((1, 2, 2), dtype=np.float32),
            "y": np.array([-7], np.int32),
            "tokens": np.array([b"longer tokens"]),
            "text": np.array(["z"]),
        },
    }
    data = from_client_dict(clients)
    path = write_fedjax_sqlite(tmp_path / "fj.sqlite", data)
    assert not (tmp_path / "fj.sqlite.tmp").exists()
    back = load_fedjax_sqlite(path)
    assert back.client_ids.tolist() == ["writer/1", "writer/0"]
    assert back.num_examples.tolist() == [3, 1]
    np.testing.assert_array_equal(back.features["x"], data.features["x"])
    assert back.features["x"].dtype == np.float32 and back.features["y"].dtype == np.int32
    assert back.features["y"].tolist() == [1, 2, 3, -7]
    assert back.features["tokens"].dtype.kind == "S"
    assert back.features["tokens"].tolist() == [b"a b", b"c", b"trail\x00x", b"longer tokens"]
    assert back.features["text"].tolist() == ["h\u00e9".encode(), b"b", b"c", b"z"]


def _fedjax_blob(columns):
    """Packs like FedJAX's serialization.py: ext 1 for numeric arrays, ext 4 for bytes."""

    def ext(value):
        if value.dtype.kind == "O":
            payload = msgpack.packb((value.shape, list(value.ravel())), use_bin_type=True)
            return msgpack.ExtType(4, payload)
        payload = msgpack.packb(
            (value.shape, value.dtype.name, value.tobytes("C")), use_bin_type=True
        )
        return msgpack.ExtType(1, payload)

    return zlib.compress(msgpack.packb(columns, default=ext, strict_types=True))


def _write_fedjax_rows(path, rows):
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, "
            "data BLOB NOT NULL, num_examples INTEGER NOT NULL)"
        )
        conn.executemany("INSERT INTO federated_data VALUES (?, ?, ?)", rows)
    conn.close()
    return path


def test_fedjax_sqlite_reads_fedjax_packing(tmp_path):
    tokens = np.array([b"hello world", b"bye"], dtype=object)
    x = np.arange(12, dtype=np.float64).reshape(2, 2, 3)
    blob = _fedjax_blob({"x": x, "tokens": tokens})
    data = load_fedjax_sqlite(_write_fedjax_rows(tmp_path / "f.sqlite", [(b"c0", blob, 2)]))
    assert data.client_ids.tolist() == ["c0"]
    np.testing.assert_array_equal(data.features["x"], x)
    assert data.features["x"].dtype == np.float64
    assert data.features["tokens"].tolist() == [b"hello world", b"bye"]


@pytest.mark.parametrize(
    "blob, num_examples, match",
    [
        (_fedjax_blob({"y": np.arange(3)}), 4, r"client 'bad': num_examples is 4 .* 'y'"),
        (b"not zlib", 1, r"client 'bad': cannot decode"),
        (zlib.compress(b"\x82\xa1y"), 1, r"client 'bad': cannot decode"),  # truncated msgpack
        (_fedjax_blob({"x": np.zeros(2)}), 2, r"client 'bad' has features \['x'\]"),
        (
            zlib.compress(msgpack.packb({"y": msgpack.ExtType(9, b"")})),
            1,
            r"client 'bad': .*extension type 9",
        ),
        (
            zlib.compress(
                msgpack.packb({"y": msgpack.ExtType(1, msgpack.packb(([1], "object", b"\0" * 8)))})
            ),
            1,
            r"client 'bad': .*object arrays are not loaded",
        ),
    ],
)
def test_fedjax_sqlite_bad_client_names_file_and_client(tmp_path, blob, num_examples, match):
    good = _fedjax_blob({"y": np.arange(2)})
    path = _write_fedjax_rows(
        tmp_path / "f.sqlite", [(b"ok", good, 2), (b"bad", blob, num_examples)]
    )
    with pytest.raises(ValueError, match=r"f\.sqlite.*" + match):
        load_fedjax_sqlite(path)


def test_fedjax_sqlite_example_shape_differs_between_clients(tmp_path):
    rows = [
        (b"a", _fedjax_blob({"x": np.zeros((2, 784), np.float32)}), 2),
        (b"b", _fedjax_blob({"x": np.zeros((2, 783), np.float32)}), 2),
    ]
    path = _write_fedjax_rows(tmp_path / "f.sqlite", rows)
    with pytest.raises(ValueError, match=r"client 'b': feature 'x' .*\(783,\).*\(784,\)"):
        load_fedjax_sqlite(path)


def test_fedjax_sqlite_not_fedjax_or_corrupt(tmp_path):
    tff = _write_tff(tmp_path / "tff.sqlite", _emnist_rows())
    with pytest.raises(ValueError, match=r"tff\.sqlite.*no such table: federated_data"):
        load_fedjax_sqlite(tff)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match=r"junk\.sqlite"):
        load_fedjax_sqlite(junk)


# -- LEAF JSON --------------------------------------------------------------------------------
def _write_leaf(path, users):
    """users: {uid: (x, y)}."""
    doc = {
        "users": list(users),
        "num_samples": [len(y) for _, y in users.values()],
        "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()},
    }
    path.write_text(json.dumps(doc))
    return path


def test_leaf_merges_files_in_order(tmp_path):
    _write_leaf(tmp_path / "all_data_1.json", {"u2": ([[0.5, 1.0]], [2.0])})
    _write_leaf(
        tmp_path / "all_data_0.json",
        {"u1": ([[0.0, 0.1], [0.2, 0.3]], [0.0, 1.0]), "u0": ([[9, 9]], [3.0])},
    )
    data = load_leaf(tmp_path)  # a directory: its files in name order
    assert data.client_ids.tolist() == ["u1", "u0", "u2"]
    assert data.num_examples.tolist() == [2, 1, 1]
    assert data.features["x"].dtype == np.float32 and data.features["x"].shape == (4, 2)
    assert data.features["y"].dtype == np.int32  # whole-number labels, as Synthetic writes
    assert data.features["y"].tolist() == [0, 1, 3, 2]
    one = load_leaf([tmp_path / "all_data_1.json"], shapes={"x": (1, 2)})
    assert one.features["x"].shape == (1, 1, 2)


def test_leaf_text_data_sets(tmp_path):
    shakespeare = _write_leaf(
        tmp_path / "shakespeare.json",
        {
            "HAMLET": (["to be or not to b", "e, that is the q"], ["e", "u"]),
            "OPHELIA": (["x"], ["y"]),
        },
    )
    data = load_leaf(shakespeare)
    assert data.features["x"].dtype.kind == "U" and data.features["x"].shape == (3,)
    assert data.features["x"][0] == "to be or not to b"
    assert data.features["y"].tolist() == ["e", "u", "y"]
    sent140 = _write_leaf(
        tmp_path / "sent140.json",
        {"user": ([["1467810369", "Mon Apr 06", "NO_QUERY", "user", "hi there"]], [1])},
    )
    data = load_leaf(sent140)
    assert data.features["x"].shape == (1, 5) and data.features["x"][0, 4] == "hi there"
    assert data.features["y"].tolist() == [1] and data.features["y"].dtype == np.int32


def test_leaf_float_labels_stay_float(tmp_path):
    path = _write_leaf(tmp_path / "r.json", {"a": ([[1.0]], [0.5])})
    assert load_leaf(path).features["y"].dtype == np.float32


def test_leaf_truncated_json(tmp_path):
    path = _write_leaf(tmp_path / "cut.json", {"a": ([[1.0, 2.0]], [0])})
    path.write_text(path.read_text()[:-7])
    with pytest.raises(ValueError, match=r"cut\.json: not valid JSON"):
        load_leaf(path)


def test_leaf_num_samples_mismatch_names_file_and_user(tmp_path):
    path = _write_leaf(tmp_path / "n.json", {"a": ([[1.0]], [0]), "b": ([[1.0], [2.0]], [0, 1])})
    doc = json.loads(path.read_text())
    doc["num_samples"][1] = 3
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"n\.json: user 'b': num_samples says 3 .* x has 2"):
        load_leaf(path)


def test_leaf_users_and_user_data_disagree(tmp_path):
    path = tmp_path / "u.json"
    doc = {"users": ["a", "b"], "num_samples": [1, 1], "user_data": {"a": {"x": [[1]], "y": [0]}}}
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"u\.json: users and user_data disagree.*\['b'\]"):
        load_leaf(path)


def test_leaf_ragged_x_names_file_and_user(tmp_path):
    path = _write_leaf(
        tmp_path / "r.json", {"a": ([[1.0, 2.0]], [0]), "b": ([[1.0, 2.0], [3.0]], [0, 1])}
    )
    with pytest.raises(ValueError, match=r"r\.json: user 'b': feature 'x': ragged: example 1"):
        load_leaf(path)
    path = _write_leaf(
        tmp_path / "s.json", {"a": ([[1.0, 2.0]], [0]), "b": ([[1.0, 2.0, 3.0]], [0])}
    )
    with pytest.raises(
        ValueError, match=r"s\.json: user 'b': feature 'x' has float32 examples of shape \(3,\)"
    ):
        load_leaf(path)


def test_leaf_user_in_two_files(tmp_path):
    a = _write_leaf(tmp_path / "train.json", {"u": ([[1.0]], [0])})
    b = _write_leaf(tmp_path / "test.json", {"u": ([[2.0]], [1])})
    with pytest.raises(ValueError, match=r"test\.json: user 'u' is also in .*train\.json"):
        load_leaf([a, b])


def test_leaf_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_leaf(tmp_path / "missing.json")


# -- the real files in ../shared/data ---------------------------------------------------------
@pytest.mark.skipif(not FEMNIST_RAW.is_dir(), reason="needs ../shared/data/femnist_leaf/raw")
@pytest.mark.parametrize("split, total", [("train", 779), ("test", 89)])
def test_real_leaf_femnist(split, total):
    path = FEMNIST_RAW / f"all_data_0_niid_05_keep_0_{split}_9.json"
    data = load_leaf(path, shapes={"x": (28, 28)})
    assert data.num_clients == 5 and data.total_examples == total
    assert data.features["x"].shape == (total, 28, 28)
    x, y = data.features["x"], data.features["y"]
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert y.dtype == np.int32 and 0 <= y.min() and y.max() <= 61
    doc = json.loads(path.read_text())
    assert data.client_ids.tolist() == doc["users"]
    last = data.get_clients([doc["users"][-1]])[doc["users"][-1]]
    assert last["y"].tolist() == doc["user_data"][doc["users"][-1]]["y"]
    np.testing.assert_array_equal(
        last["x"][-1].ravel(), np.float32(doc["user_data"][doc["users"][-1]]["x"][-1])
    )
    with pytest.raises(KeyError, match="nope"):
        data.get_clients(["nope"])


@pytest.mark.skipif(not FEDPROX.is_dir(), reason="needs ../shared/data/fedprox_synthetic")
def test_real_fedprox_synthetic():
    totals = []
    for path in sorted(FEDPROX.glob("synthetic_*_mytest.json")):
        data = load_leaf(path)
        assert data.num_clients == 30
        assert data.features["x"].shape == (data.total_examples, 60)
        y = data.features["y"]
        assert y.dtype == np.int32 and y.min() == 0 and y.max() == 9
        totals.append(data.total_examples)
    assert len(totals) == 4 and min(totals) == 805 and max(totals) == 1084
