"""Built-in real data sets: FEMNIST (105 LEAF writers) and Shakespeare by speaking role."""

import collections
import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from fedjax_sim.data import femnist, shakespeare
from fedjax_sim.data.shakespeare import (
    BOS,
    EOS,
    OOV,
    PAD,
    VOCAB,
    VOCAB_SIZE,
    decode,
    encode,
    parse_speeches,
    rows,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FEMNIST_NPZ = SHARED / "femnist_leaf" / "femnist_leaf_sf005_105writers.npz"
LEAF_JSON = SHARED / "femnist_leaf" / "raw" / "all_data_0_niid_05_keep_0_train_9.json"
TINY_SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
# The package re-exports the function under the module's name, so fetch the module itself.
femnist_module = importlib.import_module("fedjax_sim.data.femnist")


# -- FEMNIST ---------------------------------------------------------------------------------
def _needs(path):
    """Skips a test on a checkout without the data sets beside it (as test_loaders does)."""
    if not path.is_file():
        pytest.skip(f"needs ../shared/data/{path.relative_to(SHARED)}")
    return path


@pytest.fixture(scope="module")
def femnist_data():
    return femnist(_needs(FEMNIST_NPZ))


def test_femnist_writers_and_sizes(femnist_data):
    train, test = femnist_data
    assert train.num_clients == test.num_clients == 105
    assert (train.total_examples, test.total_examples) == (14708, 1685)
    counts = train.num_examples
    assert (counts.min(), np.median(counts), counts.max()) == (4, 152, 165)
    assert test.num_examples.min() >= 1
    with np.load(FEMNIST_NPZ) as raw:
        # Writer order is the file's, so client ids line up with the file's indices.
        assert train.client_ids.tolist() == raw["client_ids"].tolist()
    for split in (train, test):
        assert split.features["x"].dtype == np.float32
        assert split.features["x"].shape == (split.total_examples, 28, 28)
        assert split.features["y"].dtype == np.int32
        assert split.features["y"].min() == 0 and split.features["y"].max() == 61


def test_femnist_pixels_match_leaf_json_and_fedjax_flip(femnist_data):
    raw_train, _ = femnist(FEMNIST_NPZ, normalize=False)
    norm_train, _ = femnist_data
    # LEAF/TFF: background 1.0; FedJAX's model input is 1 - pixels: background 0.0.
    assert np.array_equal(norm_train.features["x"], 1 - raw_train.features["x"])
    raw_x = raw_train.features["x"]
    assert raw_x.min() == 0.0 and raw_x.max() == 1.0
    assert np.mean(raw_x == 1.0) > 0.8
    assert np.mean(norm_train.features["x"] == 0.0) > 0.8
    # The genuine LEAF JSON of five of these writers: same pixels (to the uint8 rounding), labels.
    leaf = json.loads(LEAF_JSON.read_text())
    for writer in leaf["users"]:
        ours = raw_train.get_clients([writer])[writer]
        theirs = leaf["user_data"][writer]
        np.testing.assert_allclose(
            ours["x"].reshape(-1, 784), np.array(theirs["x"]), atol=0.5 / 255 + 1e-6
        )
        assert ours["y"].tolist() == theirs["y"]


def test_femnist_only_digits(femnist_data):
    train, test = femnist(FEMNIST_NPZ, only_digits=True)
    assert (train.num_clients, test.num_clients) == (104, 104)
    assert (train.total_examples, test.total_examples) == (10596, 1180)
    assert train.features["y"].max() == 9 and test.features["y"].max() == 9
    full_train, _ = femnist_data
    writer = train.client_ids[3]
    everything = full_train.get_clients([writer])[writer]
    digits = train.get_clients([writer])[writer]
    keep = everything["y"] < 10
    assert np.array_equal(digits["x"], everything["x"][keep])
    assert np.array_equal(digits["y"], everything["y"][keep])


def test_femnist_missing_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nope\.npz.*path="):
        femnist(tmp_path / "nope.npz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(femnist_module, "DEFAULT_PATH", "../absent/femnist.npz")
    with pytest.raises(FileNotFoundError) as err:
        femnist_module.femnist()
    # Both default locations are named: relative to the working directory and to the repo.
    assert str(tmp_path / "../absent/femnist.npz") in str(err.value)
    assert str(femnist_module._REPO_ROOT / "../absent/femnist.npz") in str(err.value)


def _write_npz(path, **overrides):
    arrays = {
        "client_ids": np.array(["w0", "w1"]),
        "x_train": np.zeros((3, 28, 28), np.uint8),
        "y_train": np.array([0, 5, 61], np.uint8),
        "client_train": np.array([1, 0, 1], np.int32),
        "x_test": np.full((2, 28, 28), 255, np.uint8),
        "y_test": np.array([1, 2], np.uint8),
        "client_test": np.array([0, 1], np.int32),
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_femnist_small_file_groups_by_writer(tmp_path):
    train, test = femnist(_write_npz(tmp_path / "small.npz"))
    assert train.client_ids.tolist() == ["w0", "w1"]
    assert train.num_examples.tolist() == [1, 2]
    assert train.features["y"].tolist() == [5, 0, 61]
    assert np.all(test.features["x"] == 0.0)
    # Many interleaved examples: each writer's examples must keep file order (a stable sort).
    owner = np.random.default_rng(0).integers(0, 2, 500).astype(np.int32)
    labels = (np.arange(500) % 62).astype(np.uint8)
    many = _write_npz(
        tmp_path / "many.npz",
        x_train=np.zeros((500, 28, 28), np.uint8),
        y_train=labels,
        client_train=owner,
    )
    train, _ = femnist(many)
    assert train.features["y"].tolist() == labels[owner == 0].tolist() + labels[owner == 1].tolist()


def test_femnist_bad_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00not a zip archive at all" * 40)
    with pytest.raises(ValueError, match=re.escape(str(garbage)) + ".*not a readable .npz"):
        femnist(garbage)
    good = _write_npz(tmp_path / "good.npz").read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=re.escape(str(truncated))):
        femnist(truncated)
    no_key = _write_npz(tmp_path / "no_key.npz", y_test=None)
    with pytest.raises(ValueError, match=re.escape(str(no_key)) + r".*missing key.*'y_test'"):
        femnist(no_key)
    bad_owner = _write_npz(tmp_path / "owner.npz", client_train=np.array([0, 2, 1], np.int32))
    with pytest.raises(ValueError, match=r"owner\.npz: client_train .*outside \[0, 2\)"):
        femnist(bad_owner)
    bad_label = _write_npz(tmp_path / "label.npz", y_test=np.array([1, 62], np.uint8))
    with pytest.raises(ValueError, match=r"label\.npz: y_test .*outside \[0, 62\)"):
        femnist(bad_label)


# -- Shakespeare ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shakespeare_data():
    return shakespeare(_needs(TINY_SHAKESPEARE))


@pytest.fixture(scope="module")
def speeches():
    return parse_speeches(_needs(TINY_SHAKESPEARE))


def _client_speeches(data, index):
    """The speeches one client's rows encode, recovered from the BOS/EOS markers."""
    client = data.client(index)
    ids = np.concatenate([client["x"].ravel()[:1], client["y"].ravel()])
    text = decode(ids[ids != PAD])
    assert text.startswith("<bos>") and text.endswith("<eos>")
    return text[len("<bos>") : -len("<eos>")].split("<eos><bos>")


def test_shakespeare_vocabulary():
    # FedJAX's layout: PAD, BOS, EOS, then the 86 characters in FedJAX's order, then OOV.
    assert (PAD, BOS, EOS, OOV, VOCAB_SIZE) == (0, 1, 2, 89, 90)
    assert len(VOCAB) == len(set(VOCAB)) == 86
    assert encode("dh\r").tolist() == [3, 4, 88]
    assert encode("é~").tolist() == [OOV, OOV, OOV]  # é is two UTF-8 bytes
    assert decode(encode("To be, or not to be?\n")) == "To be, or not to be?\n"


def test_shakespeare_rows_match_fedjax_docstring():
    x, y = rows([encode("ABCD"), encode("E")], 3)
    a, b, c, d, e = encode("ABCDE").tolist()
    assert x.tolist() == [[BOS, a, b], [c, d, EOS], [BOS, e, PAD]]
    assert y.tolist() == [[a, b, c], [d, EOS, BOS], [e, EOS, PAD]]


def test_shakespeare_parse_and_roles(shakespeare_data, speeches):
    assert len(speeches) == 309
    assert sum(len(s) for s in speeches.values()) == 7222
    train, test = shakespeare_data
    # Kept: roles whose speeches fill one 80-id row (BOS/EOS included); 256 of 309.
    kept = [r for r, s in speeches.items() if sum(len(t) + 2 for t in s) - 1 >= 80]
    assert len(kept) == 256
    assert train.client_ids.tolist() == kept
    # The test split holds the kept roles with two or more speeches.
    assert test.client_ids.tolist() == [r for r in kept if len(speeches[r]) >= 2]
    assert test.num_clients == 241
    for data in (train, test):
        for key in ("x", "y"):
            assert data.features[key].dtype == np.int32
            assert data.features[key].shape == (data.total_examples, 80)
            assert 0 <= data.features[key].min() and data.features[key].max() < OOV


def test_shakespeare_targets_are_next_characters_of_real_text(shakespeare_data):
    train, _ = shakespeare_data
    source = TINY_SHAKESPEARE.read_text()
    x, y = train.features["x"], train.features["y"]
    # y is x shifted by one within each client's row sequence.
    for i in range(train.num_clients):
        cx, cy = (v.ravel() for v in train.client(i).values())
        real = cx != PAD
        assert np.array_equal(cx[1:][real[1:]], cy[:-1][real[1:]])
    plain = np.nonzero(np.all(x >= 3, axis=1) & np.all(y >= 3, axis=1))[0]
    assert len(plain) > 1000
    for r in plain[:: len(plain) // 200]:
        window, next_char = decode(x[r]), decode(y[r, -1])
        assert window + next_char in source
        assert decode(y[r]) == window[1:] + next_char


def test_shakespeare_split_is_disjoint_complete_and_seeded(shakespeare_data, speeches):
    train, test = shakespeare_data
    test_index = {r: i for i, r in enumerate(test.client_ids.tolist())}
    for i, role in enumerate(train.client_ids.tolist()):
        train_speeches = _client_speeches(train, i)
        test_speeches = _client_speeches(test, test_index[role]) if role in test_index else []
        # Every speech lands in exactly one split, none in both (a multiset partition).
        assert collections.Counter(train_speeches) + collections.Counter(test_speeches) == (
            collections.Counter(speeches[role])
        )
        n = len(speeches[role])
        assert len(test_speeches) == (n - max(1, int(0.8 * n)) if n >= 2 else 0)
    again_train, again_test = shakespeare(TINY_SHAKESPEARE)
    assert np.array_equal(again_train.features["x"], train.features["x"])
    assert np.array_equal(again_test.offsets, test.offsets)
    other_train, _ = shakespeare(TINY_SHAKESPEARE, seed=1)
    assert not np.array_equal(other_train.num_examples, train.num_examples)


def test_shakespeare_tiny_play(tmp_path):
    play = (
        "ALICE:\nHi bob.\n\nBOB:  \nHello.\nHow are you?\n\nALICE:\nFine.\n\nWell.\n\n"
        "CAROL:\nYo.\n"
    )
    path = tmp_path / "play.txt"
    path.write_bytes(play.replace("\n", "\r\n").encode())  # CRLF parses like LF
    assert parse_speeches(path) == {
        "ALICE": ["Hi bob.", "Fine.\n\nWell."],  # "Well." has no colon: it continues the speech
        "BOB": ["Hello.\nHow are you?"],
        "CAROL": ["Yo."],
    }
    train, test = shakespeare(path, sequence_length=8)
    # CAROL's 5 ids fill no row of 8; BOB has one speech, so no test speech.
    assert train.client_ids.tolist() == ["ALICE", "BOB"]
    assert test.client_ids.tolist() == ["ALICE"]
    bob = train.get_clients(["BOB"])["BOB"]
    assert [decode(r) for r in bob["x"]] == ["<bos>Hello.\n", "How are ", "you?" + "<pad>" * 4]
    assert [decode(r) for r in bob["y"]] == ["Hello.\nH", "ow are y", "ou?<eos>" + "<pad>" * 4]
    assert sorted(_client_speeches(train, 0) + _client_speeches(test, 0)) == [
        "Fine.\n\nWell.",
        "Hi bob.",
    ]


def test_shakespeare_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.txt.*path="):
        shakespeare(tmp_path / "absent.txt")
    prologue = tmp_path / "prologue.txt"
    prologue.write_text("A prologue line\n\nALICE:\nHi.\n")
    with pytest.raises(ValueError, match=re.escape(f"{prologue}:1: text before the first")):
        shakespeare(prologue)
    short = tmp_path / "short.txt"
    short.write_text("ALICE:\nHi.\n\nBOB:\nYo.\n")
    with pytest.raises(ValueError, match=r"short\.txt: no speaking role has text for one row"):
        shakespeare(short)
    monologue = tmp_path / "monologue.txt"
    monologue.write_text("HAMLET:\n" + "To be, or not to be, that is the question.\n" * 3)
    with pytest.raises(ValueError, match=r"monologue\.txt: .*two speeches"):
        shakespeare(monologue)
    with pytest.raises(ValueError, match="test_fraction"):
        shakespeare(short, test_fraction=1.0)
