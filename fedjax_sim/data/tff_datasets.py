"""Built-in data sets read from TensorFlow Federated's SQLite files (and FedJAX's EMNIST files):
federated EMNIST, StackOverflow next-word prediction, CIFAR-100 and Shakespeare.

Each constructor is one line to call and returns `FederatedData` splits with features "x" and
"y"; `path=None` downloads the public file into the cache (`download.fetch`). TFF clients
come in client id order, FedJAX clients in file order, each client's examples in file order.
Sources of the conventions, checked against the upstream code:

EMNIST. TFF's `tff.simulation.datasets.emnist.load_data` reads `emnist_all.sqlite`, whose
splits are "all_train"/"all_test" (3,400 writers, 62 classes) and "digits_only_train"/
"digits_only_test" (3,383 writers, 10 classes), with features `pixels` (784 floats, white
background 1.0) and `label` (int64). FedJAX's `fedjax/datasets/emnist.py` files hold `pixels`
float32 [N, 28, 28] and `label` int32, one file per split. Pixels follow `femnist.py`:
`normalize=True` gives FedJAX's model input `1 - pixels` (background 0.0).

StackOverflow. TFF's `stackoverflow.sqlite` has splits "train", "heldout" and "test" and one
example per post sentence with features `tokens` (one bytes string of space-separated,
lower-cased words), `title`, `tags`, `type`, `creation_date` and `score`; only `tokens` is used.
Token ids follow TFF's `baselines.stackoverflow.word_prediction_preprocessing`
(`get_special_tokens`, `build_to_ids_fn`), the layout `fedjax_sim.models.sequence.word_tokens`
documents: PAD 0, vocabulary word i (0-based) i + 1, then `num_oov_buckets` OOV ids, then BOS,
then EOS. (FedJAX's `StackoverflowTokenizer` uses PAD 0, BOS 1, EOS 2, words from 3 instead;
its x/y rows are otherwise the same.) A sentence's first `max_length` words become
`[BOS, w1, ..., wn]` plus EOS when n < max_length, padded with PAD to max_length + 1; "x" is
that without its last id and "y" without its first (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021: vocabulary 10,000, one OOV bucket, length 20).

CIFAR-100. TFF's `cifar100.sqlite` ("train": 500 clients, "test": 100, Pachinko allocation)
stores `image` as 3,072 int64 values (uint8 [32, 32, 3] in TFF's parse spec), `label` (fine,
0-99) and `coarse_label`. "x" is float32 in [0, 1] (`image / 255`); `normalize=True` further
applies FedJAX's `cifar100.preprocess_image` constants (per-channel mean (0.4914, 0.4822,
0.4465), std (0.2023, 0.1994, 0.2010), taken by FedJAX from kuangliu/pytorch-cifar). Random
crops and flips are training-time augmentation and are not applied here.

Shakespeare. TFF's `shakespeare.sqlite` ("train"/"test", one client per play and role) holds
one bytes string `snippets` per example; they are encoded exactly as `shakespeare.py` (FedJAX's
byte vocabulary and `preprocess_client` rows), so `char_lstm` trains on either source.

Reading. A TFF split is read in file order, client by client, decoding only the features used
and converting them at once (`_runs`, `_read_split`): no SQLite sort of a table that can hold
100 million rows, and never more than one client's decoded protos in memory.
"""

from __future__ import annotations

import heapq
import itertools
import sqlite3
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_sim.data import download, tf_example
from fedjax_sim.data.federated import Features, FederatedData
from fedjax_sim.data.fedjax_sqlite import load_fedjax_sqlite
from fedjax_sim.data.femnist import NUM_CLASSES, NUM_DIGITS
from fedjax_sim.data.shakespeare import TABLE as CHAR_TABLE
from fedjax_sim.data.shakespeare import rows as char_rows
from fedjax_sim.data.tff_sqlite import _split_counts, open_readonly

PAD = 0
STACKOVERFLOW_SPLITS = ("train", "heldout", "test")
CIFAR100_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR100_STD = np.array([0.2023, 0.1994, 0.2010], np.float32)
_EMNIST_SPLITS = {False: ("all_train", "all_test"), True: ("digits_only_train", "digits_only_test")}


def _file(path: str | Path | None, name: str) -> Path:
    return Path(path) if path is not None else download.fetch(name)


# -- EMNIST -----------------------------------------------------------------------------------
def emnist_tff(
    path: str | Path | None = None, *, only_digits: bool = False, normalize: bool = True
) -> tuple[FederatedData, FederatedData]:
    """Federated EMNIST from TFF's `emnist_all.sqlite`; returns (train, test), one client per
    writer, in client id order.

    Args:
      path: the `.sqlite` file; None downloads it (`download.fetch("tff/emnist_all")`).
      only_digits: read TFF's digits-only splits (10 classes) instead of all 62 classes.
      normalize: True gives FedJAX's model input `1 - pixels` (background 0.0); False TFF's
        raw pixels (background 1.0).

    Returns:
      (train, test) with "x" float32 [n, 28, 28] and "y" int32 [n].

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: naming the file (and client) for a missing split or feature, a corrupt file,
        or labels outside [0, 10) or [0, 62).

    Example:
      >>> train, test = emnist_tff("emnist_all.sqlite")  # doctest: +SKIP
    """
    file = _file(path, "tff/emnist_all")

    def convert(where: str, examples: list[dict]) -> Features:
        pixels = np.stack([_values(where, i, ex, "pixels", np.float32, 28 * 28)
                           for i, ex in enumerate(examples)])
        labels = np.concatenate([_values(where, i, ex, "label", np.int64, 1)
                                 for i, ex in enumerate(examples)])
        return _emnist_xy(where, pixels.reshape(-1, 28, 28), labels, only_digits, normalize)

    train, test = (_read_split(file, split, ["label", "pixels"], convert)
                   for split in _EMNIST_SPLITS[only_digits])
    return train, test


def emnist_fedjax(
    train_path: str | Path | None = None,
    test_path: str | Path | None = None,
    *,
    only_digits: bool = False,
    normalize: bool = True,
) -> tuple[FederatedData, FederatedData]:
    """Federated EMNIST from FedJAX's SQLite files (`federated_emnist_{train,test}.sqlite`, or
    the `digitsonly` ones); returns (train, test) like `emnist_tff`.

    FedJAX's client ids are `<16 hex digits>:<writer id>`; they are kept as they are. FedJAX's
    own `preprocess_batch` also adds a channel axis, which the models here do not need.

    Args:
      train_path: the train file; None downloads it ("fedjax/emnist_train", or
        "fedjax/emnist_digitsonly_train" with `only_digits`).
      test_path: the test file, likewise.
      only_digits: which files to download when a path is None, and the label range checked.
      normalize: as in `emnist_tff`.

    Returns:
      (train, test) with "x" float32 [n, 28, 28] and "y" int32 [n], clients in file order.

    Raises:
      FileNotFoundError: no file at a path.
      ValueError: naming the file for a missing or misshapen feature, a corrupt file, or labels
        out of range.
    """
    prefix = "fedjax/emnist_digitsonly_" if only_digits else "fedjax/emnist_"
    out = []
    for split, path in (("train", train_path), ("test", test_path)):
        file = _file(path, prefix + split)
        data = load_fedjax_sqlite(file)
        features = data.features
        missing = sorted({"pixels", "label"} - features.keys())
        if missing:
            raise ValueError(f"{file}: no feature(s) {missing}; the file has {sorted(features)}")
        pixels, labels = features["pixels"], features["label"]
        if pixels.shape[1:] != (28, 28) or labels.ndim != 1:
            raise ValueError(f"{file}: feature 'pixels' has shape {pixels.shape} and 'label' "
                             f"{labels.shape}; expected [n, 28, 28] and [n]")
        xy = _emnist_xy(str(file), pixels, labels, only_digits, normalize)
        out.append(FederatedData(data.client_ids, xy, data.offsets))
    return out[0], out[1]


def _emnist_xy(where: str, pixels: np.ndarray, labels: np.ndarray, only_digits: bool,
               normalize: bool) -> Features:
    _check_range(where, "label", labels, NUM_DIGITS if only_digits else NUM_CLASSES)
    pixels = pixels.astype(np.float32, copy=False)
    return {"x": 1 - pixels if normalize else pixels, "y": labels.astype(np.int32)}


def _check_range(where: str, name: str, values: np.ndarray, bound: int) -> None:
    if values.size and (values.min() < 0 or values.max() >= bound):
        raise ValueError(f"{where}: feature {name!r} holds values outside [0, {bound}) "
                         f"(min {values.min()}, max {values.max()})")


# -- StackOverflow ----------------------------------------------------------------------------
def stackoverflow_tff(
    path: str | Path | None = None,
    *,
    vocab_size: int = 10000,
    max_length: int = 20,
    num_oov_buckets: int = 1,
    vocab: Sequence[str] | None = None,
) -> tuple[FederatedData, FederatedData, FederatedData, list[str]]:
    """StackOverflow next-word prediction from TFF's `stackoverflow.sqlite`; returns
    (train, held_out, test, vocab), one client per user.

    Cost: the full file has 135.8M train, 16.5M held-out and 16.6M test sentences. Building
    the vocabulary reads the train split once more (one `collections.Counter` over every word,
    a few million distinct words), and "x" and "y" take 2 * 4 * max_length bytes a sentence
    (about 22 GB for train at length 20). Only `tokens` is decoded (about 16 us a sentence on
    one core, where decoding whole protos takes about 130 us).

    Args:
      path: the `.sqlite` file; None downloads it (`download.fetch("tff/stackoverflow")`).
      vocab_size: words in the vocabulary built from the train split (see
        `stackoverflow_vocab`); ignored when `vocab` is given.
      max_length: ids per row (20 in Reddi et al.); longer sentences are truncated.
      num_oov_buckets: OOV ids. With one, every unknown word gets it (as TFF); with more, a word
        goes to bucket `crc32(word) % num_oov_buckets`, which is stable across runs but not
        TF's FarmHash bucketing.
      vocab: the vocabulary to use (words without special tokens), e.g. TFF's word-count file.

    Returns:
      (train, held_out, test, vocab): splits with "x" and "y" int32 [n, max_length] (see the
      module docstring) and the vocabulary, word i having id i + 1. The model's output size is
      `len(vocab) + num_oov_buckets + 3` (`models.sequence.word_tokens(len(vocab),
      num_oov_buckets).size`).

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: bad arguments, or naming the file and client for a missing split or `tokens`
        feature, a corrupt file, or metadata that disagree with the examples.

    Example:
      >>> train, held_out, test, vocab = stackoverflow_tff()  # doctest: +SKIP
    """
    if max_length < 1 or num_oov_buckets < 1:
        raise ValueError(f"max_length and num_oov_buckets must be >= 1, got {max_length} and "
                         f"{num_oov_buckets}")
    file = _file(path, "tff/stackoverflow")
    vocab = list(vocab) if vocab is not None else stackoverflow_vocab(file, vocab_size)
    if not vocab:
        raise ValueError("the vocabulary is empty")
    table = {w.encode("utf-8", "surrogateescape"): i + 1 for i, w in enumerate(vocab)}
    # word_tokens' layout: PAD, words, OOV buckets, BOS, EOS.
    oov, bos = len(vocab) + 1, len(vocab) + num_oov_buckets + 1

    def lookup(word: bytes) -> int:
        return table.get(word) or oov + zlib.crc32(word) % num_oov_buckets

    def convert(where: str, examples: list[dict]) -> Features:
        words = [_single_bytes(where, i, ex, "tokens").split()[:max_length]
                 for i, ex in enumerate(examples)]
        ids = np.fromiter(map(lookup, itertools.chain.from_iterable(words)), np.int32)
        return _next_word_rows(ids, np.array([len(w) for w in words], np.int64), max_length,
                               bos)

    splits = [_read_split(file, split, ["tokens"], convert) for split in STACKOVERFLOW_SPLITS]
    return splits[0], splits[1], splits[2], vocab


def stackoverflow_vocab(path: str | Path | None = None, vocab_size: int = 10000) -> list[str]:
    """The `vocab_size` most frequent words of the StackOverflow train split.

    Frequency is the number of occurrences; ties go to the smaller word in byte order, so the
    vocabulary is deterministic. TFF's published word-count file is documented as counting the
    users who use a word instead, so its top words can differ near the cut-off. Cost: one pass
    over the train split and a `collections.Counter` of every distinct word.

    Args:
      path: TFF's `stackoverflow.sqlite`; None downloads it.
      vocab_size: the number of words kept (fewer if the split has fewer distinct words).

    Returns:
      The words, most frequent first.

    Raises:
      ValueError: `vocab_size` < 1, or as `stackoverflow_tff`.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    file = _file(path, "tff/stackoverflow")
    counts: Counter[bytes] = Counter()
    for _, where, examples in _runs(file, "train", ["tokens"]):
        # One join and split per run keeps the per-word work inside C.
        counts.update(b" ".join(_single_bytes(where, i, ex, "tokens")
                                for i, ex in enumerate(examples)).split())
    top = heapq.nsmallest(vocab_size, counts.items(), key=lambda wc: (-wc[1], wc[0]))
    return [w.decode("utf-8", "surrogateescape") for w, _ in top]


def _next_word_rows(ids: np.ndarray, lengths: np.ndarray, max_length: int, bos: int) -> Features:
    """x/y rows of sentences given as their (truncated) word ids, concatenated, and lengths."""
    n = len(lengths)
    seq = np.full((n, max_length + 1), PAD, np.int32)
    seq[:, 0] = bos
    owner = np.repeat(np.arange(n), lengths)
    position = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    seq[owner, 1 + position] = ids
    short = np.nonzero(lengths < max_length)[0]  # EOS only fits after an untruncated sentence
    seq[short, lengths[short] + 1] = bos + 1
    return {"x": seq[:, :-1], "y": seq[:, 1:]}


# -- CIFAR-100 --------------------------------------------------------------------------------
def cifar100_tff(
    path: str | Path | None = None, *, normalize: bool = False
) -> tuple[FederatedData, FederatedData]:
    """Federated CIFAR-100 from TFF's `cifar100.sqlite`; returns (train, test).

    Images are decoded client by client straight to uint8, so reading needs about 1.5 GB
    beside the 6.1 GB float32 "x" of the train split.

    Args:
      path: the `.sqlite` file; None downloads it (`download.fetch("tff/cifar100")`).
      normalize: standardize each channel with `CIFAR100_MEAN` and `CIFAR100_STD` (FedJAX's
        constants) instead of returning pixels in [0, 1].

    Returns:
      (train, test) with "x" float32 [n, 32, 32, 3] and "y" int32 [n], the fine label.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: naming the file and client for a missing split or feature, an image that is
        not 3,072 values in [0, 255], a label outside [0, 100), or a corrupt file.
    """
    file = _file(path, "tff/cifar100")

    def convert(where: str, examples: list[dict]) -> Features:
        images = np.stack([_values(where, i, ex, "image", np.int64, 32 * 32 * 3)
                           for i, ex in enumerate(examples)])
        labels = np.concatenate([_values(where, i, ex, "label", np.int64, 1)
                                 for i, ex in enumerate(examples)])
        _check_range(where, "image", images, 256)
        _check_range(where, "label", labels, 100)
        return {"x": images.astype(np.uint8).reshape(-1, 32, 32, 3),
                "y": labels.astype(np.int32)}

    out = []
    for split in ("train", "test"):
        data = _read_split(file, split, ["image", "label"], convert)
        x = data.features["x"].astype(np.float32) / np.float32(255)
        if normalize:
            x = (x - CIFAR100_MEAN) / CIFAR100_STD
        out.append(FederatedData(data.client_ids, {**data.features, "x": x}, data.offsets))
    return out[0], out[1]


# -- Shakespeare ------------------------------------------------------------------------------
def shakespeare_tff(
    path: str | Path | None = None, *, sequence_length: int = 80
) -> tuple[FederatedData, FederatedData]:
    """Shakespeare next-character prediction from TFF's `shakespeare.sqlite`; returns
    (train, test), one client per play and speaking role.

    Each snippet's bytes are mapped with `shakespeare.TABLE` (FedJAX maps bytes, not decoded
    text) and a client's snippets become rows with `shakespeare.rows`, as FedJAX's
    `shakespeare.preprocess_client` does.

    Args:
      path: the `.sqlite` file; None downloads it (`download.fetch("tff/shakespeare")`).
      sequence_length: ids per row (80 in FedJAX).

    Returns:
      (train, test) with "x" and "y" int32 [n, sequence_length].

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: naming the file and client for a missing split or `snippets` feature, or a
        corrupt file.
    """
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
    file = _file(path, "tff/shakespeare")

    def convert(where: str, examples: list[dict]) -> list[np.ndarray]:
        return [CHAR_TABLE[np.frombuffer(_single_bytes(where, i, ex, "snippets"), np.uint8)]
                for i, ex in enumerate(examples)]

    def finish(runs: list[list[np.ndarray]]) -> Features:
        x, y = char_rows(list(itertools.chain.from_iterable(runs)), sequence_length)
        return {"x": x, "y": y}

    # A client's snippets are joined across its whole split, so rows are made per client.
    return (_read_split(file, "train", ["snippets"], convert, finish),
            _read_split(file, "test", ["snippets"], convert, finish))


# -- reading TFF SQLite client by client ------------------------------------------------------
def _read_split(
    file: Path,
    split: str,
    names: list[str],
    convert: Callable[[str, list[dict]], Any],
    finish: Callable[[list], Features] | None = None,
) -> FederatedData:
    """One split as a population, holding only converted examples (never decoded protos).

    `convert(where, examples)` turns each run of one client's decoded examples into a part;
    `finish(parts)` turns a client's parts into its features (by default, concatenates them).
    Clients are sorted by id.
    """
    parts: dict[str, list] = {}
    for client, where, examples in _runs(file, split, names):
        parts.setdefault(client, []).append(convert(where, examples))
    if not parts:
        raise ValueError(f"{file}: split {split!r} has no examples")
    ids = sorted(parts)
    clients = [(finish or _concat)(parts[c]) for c in ids]
    counts = [len(next(iter(c.values()))) for c in clients]
    return FederatedData(np.array(ids), _concat(clients),
                         np.concatenate([[0], np.cumsum(counts)]))


def _concat(parts: list[Features]) -> Features:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _runs(file: Path, split: str, names: list[str]) -> Iterator[tuple[str, str, list[dict]]]:
    """Yields (client, where, decoded examples) for each run of consecutive examples of one
    client, `where` naming the file and client for error messages.

    Examples are read in file (rowid) order, so no sort of a possibly 100-million-row table
    is needed; TFF writes each client's examples together, but a client split over several
    runs is still read correctly. Where `client_metadata` disagrees with the examples table,
    raises after the last run.
    """
    seen: Counter[str] = Counter()
    with closing(open_readonly(file)) as conn:
        try:
            counts = _split_counts(file, conn, split)
            rows = conn.execute("SELECT client_id, serialized_example_proto FROM examples "
                                "WHERE split_name = ? ORDER BY rowid", (split,))
            for client, group in itertools.groupby(rows, key=lambda row: row[0]):
                where = f"{file}: client {client!r}"
                first = seen[client]
                examples = [_decode(where, first + i, blob, names)
                            for i, (_, blob) in enumerate(group)]
                seen[client] += len(examples)
                yield client, where, examples
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{file}: cannot read as a TFF SQLite file ({e})") from e
    for client in sorted(counts.keys() | seen.keys()):
        if counts.get(client, 0) != seen[client]:
            raise ValueError(
                f"{file}: client {client!r}: client_metadata lists {counts.get(client, 0)} "
                f"examples in split {split!r} but the examples table has {seen[client]} "
                "(truncated or inconsistent file)")


def _decode(where: str, index: int, blob: bytes, names: list[str]) -> dict:
    try:
        example = _select(blob, {n.encode() for n in names})
    except tf_example.DecodeError as e:
        raise ValueError(f"{where}, example {index}: cannot decode the proto ({e})") from e
    missing = [n for n in names if n.encode() not in example]
    if missing:
        raise ValueError(f"{where}, example {index}: no feature(s) {missing}; is this the "
                         "right TFF file?")
    return {n: example[n.encode()] for n in names}


def _select(blob: bytes, wanted: set[bytes]) -> dict[bytes, tf_example.FeatureValue]:
    """Decodes only the `wanted` features of a serialized `tf.train.Example`.

    Equivalent to `tf_example.parse_example` on those features (a repeated key keeps its last
    value), but skips every other feature's bytes unread: StackOverflow's protos carry five
    features besides `tokens`, and this is 8 times faster there.
    """
    out = {}
    for field, start, stop in _len_fields(blob, 0, len(blob)):
        if field != 1:  # Example.features
            continue
        for f, entry_start, entry_stop in _len_fields(blob, start, stop):
            if f != 1:  # Features.feature map entry
                continue
            key, value = b"", None
            for g, s, e in _len_fields(blob, entry_start, entry_stop):
                if g == 1:
                    key = blob[s:e]
                elif g == 2:
                    value = (s, e)
            if key in wanted:  # A map entry without a value holds an empty Feature.
                out[key] = [] if value is None else tf_example._feature(
                    memoryview(blob)[value[0]:value[1]])
    return out


def _len_fields(buf: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """(field, start, stop) of the length-delimited fields of buf[pos:end]; others skipped.

    A list, not a generator, and one-byte varints read inline: this is the hot loop.
    """
    out = []
    while pos < end:
        key = buf[pos]
        key, pos = (key, pos + 1) if key < 0x80 else tf_example._varint(buf, pos)
        wire = key & 7
        if wire == 2:
            size, pos = tf_example._varint(buf, pos)
            if pos + size > end:
                raise tf_example.DecodeError(f"field {key >> 3} needs {size} bytes but only "
                                             f"{end - pos} remain (truncated message)")
            out.append((key >> 3, pos, pos + size))
            pos += size
        elif wire == 0:
            pos = tf_example._varint(buf, pos)[1]
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise tf_example.DecodeError(f"unsupported wire type {wire} for field {key >> 3}")
    if pos > end:
        raise tf_example.DecodeError("a fixed-width field runs past the end (truncated message)")
    return out


def _single_bytes(where: str, index: int, example: dict, name: str) -> bytes:
    value = example[name]
    if not isinstance(value, list) or len(value) != 1:
        raise ValueError(f"{where}, example {index}: feature {name!r} should hold one bytes "
                         f"string, got {_describe(value)}")
    return value[0]


def _values(where: str, index: int, example: dict, name: str, dtype: type,
            size: int) -> np.ndarray:
    value = example[name]
    if isinstance(value, list) or value.dtype != dtype or len(value) != size:
        raise ValueError(f"{where}, example {index}: feature {name!r} should hold {size} "
                         f"{np.dtype(dtype)} value(s), got {_describe(value)}")
    return value


def _describe(value: tf_example.FeatureValue) -> str:
    if isinstance(value, list):
        return f"{len(value)} bytes string(s)"
    return f"{len(value)} {value.dtype} value(s)"
