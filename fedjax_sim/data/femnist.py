"""FEMNIST: handwritten digits and letters federated by writer (LEAF's 105-writer sample).

The data are genuine LEAF output (Caldas et al., 2018, "LEAF: A Benchmark for Federated
Settings"; `--sf 0.05 niid`, split by sample), packed into one `.npz`: `client_ids` str[W];
`x_train` uint8[n, 28, 28] = round(255 * LEAF value); `y_train` uint8[n] in 0..61 (0-9 digits,
10-35 upper case, 36-61 lower case); `client_train` int32[n], an index into `client_ids`; and
`x_test`, `y_test`, `client_test` likewise.

Pixel convention. LEAF's `data/femnist/preprocess/data_to_json.py` stores
`np.asarray(img.convert("L")) / 255`, so its values are exact multiples of 1/255 with the white
background at 1.0, and `x_uint8 / 255` recovers them bit for bit; TFF's federated EMNIST
`pixels` use the same convention. FedJAX's `fedjax/datasets/emnist.py` (`preprocess_batch`)
feeds its models `x = 1 - pixels`, background 0.0 and ink near 1.0 (the MNIST convention), and
that is what `normalize=True` gives.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from fedjax_sim.data.federated import FederatedData

NUM_CLASSES = 62
NUM_DIGITS = 10
DEFAULT_PATH = "../shared/data/femnist_leaf/femnist_leaf_sf005_105writers.npz"
_KEYS = ("client_ids", "x_train", "y_train", "client_train", "x_test", "y_test", "client_test")

# The repository root: data sets shipped beside the project live at `<root>/../shared/data`.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def find_data_file(path: str | Path | None, default: str, what: str) -> Path:
    """Resolves a data file: `path` if given, else `default` relative to the working directory or
    to the repository root, whichever exists.

    Raises:
      FileNotFoundError: naming every path tried and how to pass one with `path=`.
    """
    if path is not None:
        tried = [Path(path)]
    else:
        tried = [Path.cwd() / default, _REPO_ROOT / default]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{what} file not found; tried: {', '.join(str(p) for p in tried)}. Pass the file's "
        f"location with path=..."
    )


def femnist(
    path: str | Path | None = None, *, normalize: bool = True, only_digits: bool = False
) -> tuple[FederatedData, FederatedData]:
    """Loads the 105 FEMNIST writers of LEAF; returns (train, test), one client per writer.

    Args:
      path: the `.npz` file; by default `../shared/data/femnist_leaf/...` (see `DEFAULT_PATH`)
        relative to the working directory or to the repository root.
      normalize: True gives FedJAX's model input `1 - pixels` (background 0.0, ink near 1.0);
        False gives LEAF's and TFF's raw pixels (background 1.0).
      only_digits: keep labels 0-9 only (as TFF's `only_digits=True`); writers left without
        examples in a split are dropped from that split.

    Returns:
      (train, test) with features "x" float32[n, 28, 28] and "y" int32[n]; clients are in the
      file's writer order and each client's examples in file order.

    Raises:
      FileNotFoundError: no file at `path` (or at either default location).
      ValueError: the file is not a readable `.npz`, lacks a key, or holds out-of-range client
        indices or labels; the message names the file.

    Example:
      >>> train, test = femnist()
      >>> train.num_clients, train.total_examples
      (105, 14708)
    """
    file = find_data_file(path, DEFAULT_PATH, "FEMNIST")
    arrays = _read_npz(file)
    ids = arrays["client_ids"].astype(str)
    splits = []
    for split in ("train", "test"):
        x, y, owner = (arrays[f"{k}_{split}"] for k in ("x", "y", "client"))
        _check_split(file, split, x, y, owner, len(ids))
        if only_digits:
            keep = y < NUM_DIGITS
            x, y, owner = x[keep], y[keep], owner[keep]
        pixels = x.astype(np.float32) / np.float32(255)
        splits.append(_by_writer(ids, owner, 1 - pixels if normalize else pixels, y))
    return splits[0], splits[1]


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    """Reads every needed array now, so a truncated member fails here with the file's name."""
    try:
        loaded = np.load(file, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single .npy array, not a .npz archive")
        with loaded:
            arrays = {k: loaded[k] for k in _KEYS if k in loaded.files}
    # np.load reports a file that is not a zip archive as "pickled data", hence ValueError here.
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"{file}: not a readable .npz file ({err})") from err
    missing = [k for k in _KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{file}: missing key(s) {missing}; a FEMNIST .npz needs {list(_KEYS)}")
    return arrays


def _check_split(file: Path, split: str, x, y, owner, num_writers: int) -> None:
    n = len(y)
    if x.dtype != np.uint8 or x.shape != (n, 28, 28) or owner.shape != (n,) or y.ndim != 1:
        raise ValueError(
            f"{file}: {split} split has x {x.dtype}{list(x.shape)}, y {list(y.shape)}, client "
            f"{list(owner.shape)}; expected x uint8[n, 28, 28] and y, client [n]"
        )
    if n and (owner.min() < 0 or owner.max() >= num_writers):
        raise ValueError(
            f"{file}: client_{split} holds writer indices outside [0, {num_writers}) "
            f"(min {owner.min()}, max {owner.max()})"
        )
    if n and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise ValueError(
            f"{file}: y_{split} holds labels outside [0, {NUM_CLASSES}) "
            f"(min {y.min()}, max {y.max()})"
        )


def _by_writer(ids: np.ndarray, owner: np.ndarray, x: np.ndarray, y: np.ndarray) -> FederatedData:
    """Groups the examples by writer (stable, so file order is kept), dropping empty writers."""
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=len(ids))
    present = counts > 0
    return FederatedData(
        ids[present],
        {"x": x[order], "y": y[order].astype(np.int32)},
        np.concatenate([[0], np.cumsum(counts[present])]),
    )
