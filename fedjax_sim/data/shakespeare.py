"""Shakespeare next-character prediction, federated by speaking role (LEAF / FedJAX style).

Partition. As LEAF's Shakespeare (Caldas et al., 2018, "LEAF: A Benchmark for Federated
Settings"), each speaking role is a client and its speeches are its data. Tiny Shakespeare
(karpathy/char-rnn) has no play names, so same-named roles of different plays are one client.
A speech is a `NAME:` line at the start of the file or after a blank line, then its text lines;
a block after a blank line that does not start with `NAME:` continues the previous speech.

Encoding. FedJAX's `fedjax/datasets/shakespeare.py` character vocabulary, copied exactly: the
86 bytes of `VOCAB` (from TFF's text-generation tutorial) get ids 3..88 in that order, after
PAD=0, BOS=1, EOS=2; every other byte is OOV=89; `VOCAB_SIZE` = 90. Text is encoded as UTF-8
bytes, as FedJAX encodes its byte snippets.

Examples. FedJAX's `preprocess_client`: a client's speeches are joined into one id sequence,
each speech wrapped as BOS, text, EOS; then cut into consecutive, non-overlapping rows of
`sequence_length`, "x" the sequence without its last id and "y" without its first (next-character
targets at every position), the last row padded with PAD in both. Loss and accuracy must skip
positions where y == PAD. (LEAF instead slides an 80-character window by one character with a
single next-character target, which repeats every character 80 times.)

Split. Per role, whole speeches are split at random (seeded) in LEAF's proportions
(`data/utils/split_data.py`, by sample: `max(1, int((1 - test_fraction) * n))` speeches train,
the rest test, for roles with at least two speeches); splitting whole speeches keeps every
character of a test speech out of the training text. A role with one speech is train only.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fedjax_sim.data.federated import FederatedData
from fedjax_sim.data.femnist import find_data_file

DEFAULT_PATH = "../shared/data/tinyshakespeare/input.txt"

# FedJAX's vocabulary, byte for byte (fedjax/datasets/shakespeare.py, `_build_look_up_table`).
VOCAB = (
    b"dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
)
PAD, BOS, EOS = 0, 1, 2
OOV = 3 + len(VOCAB)
VOCAB_SIZE = OOV + 1
TABLE = np.full(256, OOV, dtype=np.int32)
TABLE[np.frombuffer(VOCAB, dtype=np.uint8)] = np.arange(3, OOV, dtype=np.int32)

_HEADER = re.compile(r"([^:\s][^:]*):\s*")
_SPECIAL_NAMES = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", OOV: "<oov>"}


def shakespeare(
    path: str | Path | None = None,
    *,
    sequence_length: int = 80,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[FederatedData, FederatedData]:
    """Loads Tiny Shakespeare federated by speaking role; returns (train, test).

    Args:
      path: the text file; by default `../shared/data/tinyshakespeare/input.txt` relative to the
        working directory or to the repository root.
      sequence_length: ids per row (80 in LEAF and FedJAX).
      test_fraction: share of each role's speeches held out, as in LEAF's split.
      seed: seeds which speeches are held out.

    Returns:
      (train, test) with features "x" and "y", int32[n, sequence_length] (see the module
      docstring). Client ids are role names, in order of first appearance. A role is kept if
      all its speeches together fill at least one row without padding (256 of Tiny
      Shakespeare's 309 roles at length 80); the test split holds the kept roles with at least
      two speeches.

    Raises:
      FileNotFoundError: no file at `path` (or at either default location).
      ValueError: bad arguments, or text before the first `NAME:` line (naming file and line).

    Example:
      >>> train, test = shakespeare()
      >>> train.num_clients, train.features["x"].shape[1]
      (256, 80)
    """
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    file = find_data_file(path, DEFAULT_PATH, "Tiny Shakespeare")
    roles = parse_speeches(file)
    rng = np.random.default_rng(seed)
    train, test = {}, {}
    for role, speeches in roles.items():
        encoded = [encode(s) for s in speeches]
        # Joined with BOS/EOS, J ids give J - 1 (input, next id) pairs; a full row needs L.
        if sum(len(e) + 2 for e in encoded) - 1 < sequence_length:
            continue
        n = len(encoded)
        is_test = np.zeros(n, dtype=bool)
        if n >= 2:
            is_test[rng.permutation(n)[: n - max(1, int((1 - test_fraction) * n))]] = True
            test[role] = [e for e, t in zip(encoded, is_test, strict=True) if t]
        train[role] = [e for e, t in zip(encoded, is_test, strict=True) if not t]
    if not train:
        raise ValueError(f"{file}: no speaking role has text for one row of {sequence_length}")
    if not test:
        raise ValueError(f"{file}: no kept speaking role has two speeches to split off a test set")
    return _population(train, sequence_length), _population(test, sequence_length)


def parse_speeches(file: str | Path) -> dict[str, list[str]]:
    """Reads a play text as {role: [speech text, ...]}, roles in order of first appearance.

    Lines are read with universal newlines, so CRLF files parse like LF files. Each speech's
    text keeps its line breaks, without trailing whitespace. A text line after a blank line that
    looks like `NAME:` (no other colon) is read as a new speaker: the format cannot tell them
    apart.
    """
    roles: dict[str, list[str]] = {}
    speech: list[str] | None = None
    after_blank = True
    if Path(file).is_dir():
        raise IsADirectoryError(f"{file} is a directory; pass the play's text file")
    try:
        lines = Path(file).read_text(encoding="utf-8-sig").split("\n")  # -sig: drop a BOM
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start}): pass the "
                         "play as plain text") from None
    for number, line in enumerate(lines, start=1):
        header = _HEADER.fullmatch(line) if after_blank else None
        if header:
            speech = []
            roles.setdefault(header.group(1).strip(), []).append(speech)
        elif speech is None:
            if line.strip():
                raise ValueError(
                    f"{file}:{number}: text before the first speaker line ('NAME:' after "
                    "a blank line)"
                )
        else:
            speech.append(line)
        after_blank = not line.strip()
    return {r: ["\n".join(s).rstrip() for s in speeches] for r, speeches in roles.items()}


def encode(text: str) -> np.ndarray:
    """The FedJAX ids (int32) of `text`'s UTF-8 bytes, without BOS/EOS."""
    return TABLE[np.frombuffer(text.encode("utf-8"), dtype=np.uint8)]


def decode(ids) -> str:
    """Text of FedJAX ids; PAD, BOS, EOS and OOV are written `<pad>`, `<bos>`, `<eos>`, `<oov>`.

    Vocabulary ids decode as Latin-1 bytes, which is exact for the (ASCII) vocabulary.
    """
    return "".join(
        _SPECIAL_NAMES[int(i)] if int(i) in _SPECIAL_NAMES else chr(VOCAB[int(i) - 3])
        for i in np.asarray(ids).ravel()
    )


def rows(speeches: list[np.ndarray], sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
    """FedJAX's `preprocess_client`: (x, y) rows of one client's encoded speeches.

    Example (FedJAX's docstring): speeches "ABCD", "E" with sequence_length 3 give
    x = [[BOS, A, B], [C, D, EOS], [BOS, E, PAD]] and y = [[A, B, C], [D, EOS, BOS], [E, EOS, PAD]].
    """
    joined = np.concatenate([np.concatenate([[BOS], s, [EOS]]) for s in speeches]).astype(np.int32)
    padded = -(-(len(joined) - 1) // sequence_length) * sequence_length
    x = np.full(padded, PAD, dtype=np.int32)
    y = np.full(padded, PAD, dtype=np.int32)
    x[: len(joined) - 1] = joined[:-1]
    y[: len(joined) - 1] = joined[1:]
    return x.reshape(-1, sequence_length), y.reshape(-1, sequence_length)


def _population(clients: dict[str, list[np.ndarray]], sequence_length: int) -> FederatedData:
    xs, ys = zip(*(rows(s, sequence_length) for s in clients.values()), strict=True)
    counts = [len(x) for x in xs]
    return FederatedData(
        np.array(list(clients), dtype=str),
        {"x": np.concatenate(xs), "y": np.concatenate(ys)},
        np.concatenate([[0], np.cumsum(counts)]),
    )
