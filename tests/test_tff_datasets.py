"""Built-in TFF / FedJAX data sets: EMNIST, StackOverflow, CIFAR-100 and Shakespeare.

The public files are not on this machine, so each test builds a small file of the same format
(TFF: `examples` and `client_metadata` tables of serialized `tf.train.Example`s with the
upstream feature names and types; FedJAX: `write_fedjax_sqlite`).
"""

from __future__ import annotations

import sqlite3
import zlib
from contextlib import closing

import numpy as np
import pytest

from fedjax_sim.data import (
    cifar100_tff,
    emnist_fedjax,
    emnist_tff,
    from_client_dict,
    shakespeare_tff,
    stackoverflow_tff,
    write_fedjax_sqlite,
)
from fedjax_sim.data.shakespeare import BOS, EOS, OOV, PAD, TABLE, encode
from fedjax_sim.data.shakespeare import rows as char_rows
from fedjax_sim.data.tf_example import DecodeError, encode_example, parse_example
from fedjax_sim.data.tff_datasets import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    _select,
    stackoverflow_vocab,
)


def _write_tff(path, rows, metadata=None):
    """rows: (split, client, features or raw bytes); metadata defaults to the true counts."""
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                     "serialized_example_proto BLOB NOT NULL)")
        conn.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT "
                     "NOT NULL, num_examples INTEGER NOT NULL)")
        counts = {}
        for split, client, features in rows:
            blob = features if isinstance(features, bytes) else encode_example(features)
            conn.execute("INSERT INTO examples VALUES (?, ?, ?)", (split, client, blob))
            counts[client, split] = counts.get((client, split), 0) + 1
        conn.executemany("INSERT INTO client_metadata VALUES (?, ?, ?)",
                         [(c, s, n) for (c, s), n in (metadata or counts).items()])
        conn.commit()
    return path


# -- EMNIST -----------------------------------------------------------------------------------
def _digit(label, ink=0.25):
    """TFF pixels: white background 1.0, one stroke of `ink`."""
    pixels = np.ones((28, 28), np.float32)
    pixels[10:18, 14] = ink
    return {"label": label, "pixels": pixels.ravel()}


def _emnist_rows(label=61):
    return [
        ("all_train", "f0002_07", _digit(3)),
        ("all_train", "f0001_41", _digit(label, ink=0.5)),
        ("all_train", "f0002_07", _digit(36)),
        ("all_test", "f0001_41", _digit(9)),
        ("digits_only_train", "f0001_41", _digit(7)),
        ("digits_only_test", "f0001_41", _digit(1)),
    ]


def test_emnist_tff_pixels_labels_and_splits(tmp_path):
    path = _write_tff(tmp_path / "emnist_all.sqlite", _emnist_rows())
    train, test = emnist_tff(path)
    assert train.client_ids.tolist() == ["f0001_41", "f0002_07"]
    assert train.num_examples.tolist() == [1, 2]
    x, y = train.features["x"], train.features["y"]
    assert x.dtype == np.float32 and x.shape == (3, 28, 28)
    assert y.dtype == np.int32 and y.tolist() == [61, 3, 36]  # file order within a client
    # normalize=True is FedJAX's 1 - pixels: background 0, ink 1 - TFF value.
    assert x[:, 0, 0].tolist() == [0, 0, 0] and x[:, 12, 14].tolist() == [0.5, 0.75, 0.75]
    raw, _ = emnist_tff(path, normalize=False)
    np.testing.assert_array_equal(raw.features["x"], 1 - x)
    assert test.features["y"].tolist() == [9]
    digits_train, digits_test = emnist_tff(path, only_digits=True)
    assert digits_train.features["y"].tolist() == [7] and digits_test.features["y"].tolist() == [1]


def test_emnist_tff_bad_input(tmp_path):
    rows = _emnist_rows()
    del rows[1][2]["label"]
    path = _write_tff(tmp_path / "nolabel.sqlite", rows)
    with pytest.raises(ValueError, match=r"nolabel\.sqlite: client 'f0001_41', example 0: no "
                                         r"feature\(s\) \['label'\]"):
        emnist_tff(path)
    path = _write_tff(tmp_path / "badlabel.sqlite", _emnist_rows(label=62))
    with pytest.raises(ValueError, match=r"badlabel\.sqlite: client 'f0001_41': feature 'label' "
                                         r"holds values outside \[0, 62\)"):
        emnist_tff(path)
    only_train = _write_tff(tmp_path / "old.sqlite", [("train", "f1", _digit(1))])
    with pytest.raises(ValueError, match=r"old\.sqlite: unknown split 'all_train'.*\['train'\]"):
        emnist_tff(only_train)


def test_emnist_fedjax(tmp_path):
    rng = np.random.default_rng(0)

    def split(labels):
        n = len(labels)
        pixels = rng.random((n, 28, 28), dtype=np.float32)
        return {"pixels": pixels, "label": np.array(labels, np.int32)}

    clients = {"0123456789abcdef:f0000_14": split([0, 61]), "fedcba9876543210:f0001_02": split([5])}
    train_file = write_fedjax_sqlite(tmp_path / "train.sqlite", from_client_dict(clients))
    test_file = write_fedjax_sqlite(tmp_path / "test.sqlite",
                                    from_client_dict({"0123456789abcdef:f0000_14": split([7])}))
    train, test = emnist_fedjax(train_file, test_file)
    assert train.client_ids.tolist() == list(clients)
    x = train.features["x"]
    assert x.dtype == np.float32 and x.shape == (3, 28, 28)
    np.testing.assert_allclose(x[:2], 1 - clients["0123456789abcdef:f0000_14"]["pixels"])
    assert train.features["y"].dtype == np.int32 and train.features["y"].tolist() == [0, 61, 5]
    assert test.features["y"].tolist() == [7]
    with pytest.raises(ValueError, match=r"train\.sqlite.*outside \[0, 10\)"):
        emnist_fedjax(train_file, test_file, only_digits=True)
    no_label = {"c": {"pixels": np.zeros((1, 28, 28), np.float32)}}
    bad = write_fedjax_sqlite(tmp_path / "bad.sqlite", from_client_dict(no_label))
    with pytest.raises(ValueError, match=r"bad\.sqlite: no feature\(s\) \['label'\]"):
        emnist_fedjax(bad, test_file)


# -- StackOverflow ----------------------------------------------------------------------------
def _post(tokens):
    """A StackOverflow example with all six TFF features."""
    return {"creation_date": b"2010-01-08 09:34:05 UTC", "score": 3, "tags": b"sql|median",
            "title": b"median in sql", "tokens": tokens, "type": b"answer"}


_SO_ROWS = [
    # Train word counts: the 3, cat 2, then bat, a, dog 1 each (ties go to byte order, not
    # to the order of first appearance).
    ("train", "u1", _post(b"the cat bat")),
    ("train", "u2", _post(b"a cat the")),
    ("train", "u1", _post(b"the dog")),  # u1's rows are not contiguous in the file
    ("heldout", "u3", _post(b"a a a a a")),
    ("heldout", "u3", _post(b"a cat a cat")),
    ("test", "u2", _post(b"")),
]


def test_stackoverflow_vocabulary_ids_and_shift(tmp_path):
    from fedjax_sim.models.sequence import word_tokens

    path = _write_tff(tmp_path / "stackoverflow.sqlite", _SO_ROWS)
    train, held_out, test, vocab = stackoverflow_tff(path, vocab_size=3, max_length=4)
    assert vocab == ["the", "cat", "a"]
    assert stackoverflow_vocab(path, 10) == ["the", "cat", "a", "bat", "dog"]
    tokens = word_tokens(len(vocab), 1)  # the layout the word-LSTM expects
    assert (tokens.pad, tokens.oov, tokens.bos, tokens.eos) == (0, (4,), 5, 6)
    the, cat, a, oov, bos, eos = 1, 2, 3, 4, 5, 6
    assert train.client_ids.tolist() == ["u1", "u2"] and train.num_examples.tolist() == [2, 1]
    x, y = train.features["x"], train.features["y"]
    assert x.dtype == np.int32 and x.shape == (3, 4) and y.dtype == np.int32
    # "the cat bat", "the dog" (u1, file order), "a cat the" (u2): y is x shifted left, and
    # a short sentence's EOS is also an input (its target is PAD, which the loss skips).
    assert x.tolist() == [[bos, the, cat, oov], [bos, the, oov, eos], [bos, a, cat, the]]
    assert y.tolist() == [[the, cat, oov, eos], [the, oov, eos, 0], [a, cat, the, eos]]
    # Five words truncated to four, and exactly four words: no room for EOS in either.
    assert held_out.features["x"].tolist() == [[bos, a, a, a], [bos, a, cat, a]]
    assert held_out.features["y"].tolist() == [[a, a, a, a], [a, cat, a, cat]]
    assert test.features["x"].tolist() == [[bos, eos, 0, 0]]
    assert test.features["y"].tolist() == [[eos, 0, 0, 0]]


def test_stackoverflow_given_vocab_and_oov_buckets(tmp_path):
    from fedjax_sim.models.sequence import word_tokens

    path = _write_tff(tmp_path / "so.sqlite", _SO_ROWS)
    train, _, _, vocab = stackoverflow_tff(path, vocab=["cat", "the"], num_oov_buckets=2,
                                           max_length=3)
    assert vocab == ["cat", "the"]
    tokens = word_tokens(2, 2)
    x = train.features["x"]
    assert x[:, 0].tolist() == [tokens.bos] * 3
    assert x[0, 1:].tolist() == [2, 1]  # "the cat" (bat)
    assert train.features["y"][1].tolist() == [2, x[1, 2], tokens.eos]  # "the dog" + EOS
    bat, dog = train.features["y"][0, 2], x[1, 2]
    # Unknown words are hashed into the buckets by crc32 (documented; not TF's FarmHash).
    assert bat == tokens.oov[zlib.crc32(b"bat") % 2] and dog == tokens.oov[zlib.crc32(b"dog") % 2]
    again, *_ = stackoverflow_tff(path, vocab=["cat", "the"], num_oov_buckets=2, max_length=3)
    np.testing.assert_array_equal(again.features["x"], x)  # deterministic buckets


def test_stackoverflow_bad_input(tmp_path):
    rows = list(_SO_ROWS)
    rows[2] = ("train", "u1", {k: v for k, v in _post(b"x").items() if k != "tokens"})
    path = _write_tff(tmp_path / "notokens.sqlite", rows)
    with pytest.raises(ValueError, match=r"notokens\.sqlite: client 'u1', example 1: no "
                                         r"feature\(s\) \['tokens'\]"):
        stackoverflow_tff(path)
    cut = _write_tff(tmp_path / "cut.sqlite", _SO_ROWS,
                     metadata={("u1", "train"): 3, ("u2", "train"): 1, ("u3", "heldout"): 2,
                               ("u2", "test"): 1})
    with pytest.raises(ValueError, match=r"cut\.sqlite: client 'u1': client_metadata lists 3 "
                                         r"examples in split 'train' but the examples table "
                                         r"has 2"):
        stackoverflow_tff(cut, vocab=["a"])
    with pytest.raises(ValueError, match="max_length"):
        stackoverflow_tff(path, max_length=0)


def test_select_decodes_like_parse_example():
    # Unpacked ints, a float list, two Examples concatenated (protobuf merges them: the later
    # "tokens" wins) and a truncated proto.
    first = encode_example({"score": [-5, 7], "tokens": b"old", "pixels": [0.5, 1.0]},
                           packed=False)
    blob = first + encode_example({"tokens": b"new words"})
    wanted = {b"tokens", b"score", b"pixels"}
    selected = _select(blob, wanted)
    parsed = parse_example(blob)
    assert selected[b"tokens"] == parsed["tokens"] == [b"new words"]
    np.testing.assert_array_equal(selected[b"score"], parsed["score"])
    np.testing.assert_array_equal(selected[b"pixels"], parsed["pixels"])
    assert _select(blob, {b"absent"}) == {}
    with pytest.raises(DecodeError, match="truncated"):
        _select(blob[:-3], wanted)


# -- CIFAR-100 --------------------------------------------------------------------------------
def _image(seed):
    return np.random.default_rng(seed).integers(0, 256, 32 * 32 * 3)


def _cifar_rows():
    rows = [("train", str(c), {"coarse_label": c, "image": _image(10 * c + k),
                               "label": 40 * c + k + 10})
            for k in range(2) for c in range(3)]
    rows.append(("test", "0", {"coarse_label": 19, "image": _image(99), "label": 99}))
    return rows


def test_cifar100_tff(tmp_path):
    path = _write_tff(tmp_path / "cifar100.sqlite", _cifar_rows())
    train, test = cifar100_tff(path)
    assert train.client_ids.tolist() == ["0", "1", "2"] and train.num_examples.tolist() == [2] * 3
    x = train.features["x"]
    assert x.dtype == np.float32 and x.shape == (6, 32, 32, 3) and 0 <= x.min() <= x.max() <= 1
    np.testing.assert_allclose(x[2].ravel(), _image(10) / 255, rtol=1e-6)  # client "1", first
    y = train.features["y"]
    assert y.dtype == np.int32 and y.tolist() == [10, 11, 50, 51, 90, 91]  # fine labels
    assert test.features["y"].tolist() == [99] and set(train.features) == {"x", "y"}
    standardized, _ = cifar100_tff(path, normalize=True)
    np.testing.assert_allclose(standardized.features["x"], (x - CIFAR100_MEAN) / CIFAR100_STD,
                               rtol=1e-5)


def test_cifar100_bad_input(tmp_path):
    rows = _cifar_rows()
    del rows[4][2]["label"]  # client "1", example 1
    path = _write_tff(tmp_path / "nolabel.sqlite", rows)
    with pytest.raises(ValueError, match=r"nolabel\.sqlite: client '1', example 1: no "
                                         r"feature\(s\) \['label'\]"):
        cifar100_tff(path)
    rows = _cifar_rows()
    rows[0][2]["image"] = np.full(3072, 256)
    path = _write_tff(tmp_path / "bright.sqlite", rows)
    with pytest.raises(ValueError, match=r"bright\.sqlite: client '0'.*'image'.*outside "
                                         r"\[0, 256\)"):
        cifar100_tff(path)
    rows = _cifar_rows()
    rows[0][2]["image"] = np.zeros(3072, np.float32)
    path = _write_tff(tmp_path / "floats.sqlite", rows)
    with pytest.raises(ValueError, match=r"'image' should hold 3072 int64 value\(s\), got "
                                         r"3072 float32"):
        cifar100_tff(path)


# -- Shakespeare ------------------------------------------------------------------------------
def test_shakespeare_tff_matches_fedjax_rows(tmp_path):
    role = "THE_TRAGEDY_OF_KING_LEAR_KING"
    speech = b"Meantime we shall express our darker purpose.\nGive me the map there."
    rows = [
        ("train", "ALL_S_WELL_THAT_ENDS_WELL_HELENA", {"snippets": b"ABCD"}),
        ("train", role, {"snippets": speech}),
        ("train", "ALL_S_WELL_THAT_ENDS_WELL_HELENA", {"snippets": b"E"}),
        ("test", role, {"snippets": b"Know that we have divided \xe2\x80\x94 our kingdom"}),
    ]
    path = _write_tff(tmp_path / "shakespeare.sqlite", rows)
    train, test = shakespeare_tff(path, sequence_length=3)
    # FedJAX's preprocess_client docstring: "ABCD", "E" with sequence_length 3.
    a, b, c, d, e = (int(TABLE[ord(ch)]) for ch in "ABCDE")
    bos, eos, pad = BOS, EOS, PAD
    helena = train.client(0)
    assert helena["x"].tolist() == [[bos, a, b], [c, d, eos], [bos, e, pad]]
    assert helena["y"].tolist() == [[a, b, c], [d, eos, bos], [e, eos, pad]]
    lear = train.client(1)
    want_x, want_y = char_rows([encode(speech.decode())], 3)
    assert lear["x"].dtype == np.int32
    np.testing.assert_array_equal(lear["x"], want_x)
    np.testing.assert_array_equal(lear["y"], want_y)
    # Bytes outside the vocabulary (here a UTF-8 em dash) are OOV, byte by byte, as in FedJAX.
    assert (test.features["x"] == OOV).sum() == 3
    _, long_test = shakespeare_tff(path)
    assert long_test.features["x"].shape == (1, 80)


def test_shakespeare_tff_bad_input(tmp_path):
    rows = [("train", "R", {"snippets": b"ok"}), ("train", "R", {"text": b"wrong name"}),
            ("test", "R", {"snippets": b"ok"})]
    path = _write_tff(tmp_path / "renamed.sqlite", rows)
    with pytest.raises(ValueError, match=r"renamed\.sqlite: client 'R', example 1: no "
                                         r"feature\(s\) \['snippets'\]"):
        shakespeare_tff(path)
    rows[1] = ("train", "R", encode_example({"snippets": b"cut short"})[:-4])
    path = _write_tff(tmp_path / "corrupt.sqlite", rows)
    with pytest.raises(ValueError, match=r"corrupt\.sqlite: client 'R', example 1: cannot "
                                         r"decode the proto"):
        shakespeare_tff(path)
