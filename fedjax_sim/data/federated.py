"""`FederatedData`: a population of clients stored column by column.

Every feature is one flat array whose rows are grouped by client; `offsets[i]:offsets[i + 1]`
are client i's rows. There are no per-client Python objects, so a population of millions of
clients costs a few arrays, and a cohort's examples are found by arithmetic on `offsets`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np

Features = dict[str, np.ndarray]


class FederatedData:
    """A federated data set: named feature columns plus per-client row offsets.

    Args:
      client_ids: str[N], the clients' names.
      features: dict of arrays with a common first dimension (all examples, grouped by client).
      offsets: int64[N + 1], client i's examples are rows `offsets[i]:offsets[i + 1]`.

    Use `from_arrays` or `from_client_dict` to build one; they validate the input.
    """

    def __init__(self, client_ids: np.ndarray, features: Features, offsets: np.ndarray):
        self.client_ids = np.asarray(client_ids)
        if not isinstance(features, Mapping):
            raise TypeError(f"FederatedData: features must be a dict {{name: array}}, got "
                            f"{type(features).__name__}")
        self.features = dict(features)
        self.offsets = np.asarray(offsets)
        if self.offsets.dtype.kind not in "iu":
            raise TypeError(f"FederatedData: offsets must be integers, got {self.offsets.dtype}")
        self.offsets = self.offsets.astype(np.int64)
        self._validate()

    def _validate(self) -> None:
        """Cheap checks of the layout (O(clients)), so a population built by hand fails here
        and not as a wrong gather rounds later."""
        n, off = len(self.client_ids), self.offsets
        if self.client_ids.ndim != 1:
            raise ValueError(f"FederatedData: client_ids must be 1-D, got shape "
                             f"{self.client_ids.shape}")
        if off.shape != (n + 1,):
            raise ValueError(f"FederatedData: offsets must have one entry per client plus one "
                             f"({n + 1} for {n} clients), got shape {off.shape}; client i's rows "
                             "are offsets[i]:offsets[i + 1]")
        if off[0] != 0 or np.any(np.diff(off) < 0):
            raise ValueError("FederatedData: offsets must start at 0 and never decrease (they "
                             f"are cumulative example counts), got {off[:5].tolist()}...")
        empty = np.flatnonzero(np.diff(off) == 0)
        if len(empty):  # refused here, not rounds later when a cohort samples one
            raise ValueError(f"FederatedData: {len(empty)} client(s) have zero examples, e.g. "
                             f"{self.client_ids[empty[:3]].tolist()}; leave them out (the "
                             "builders from_arrays and from_client_dict drop them)")
        for k, v in self.features.items():
            if not (hasattr(v, "shape") and hasattr(v, "dtype")):
                raise TypeError(f"FederatedData: feature {k!r} must be an array (numpy), got "
                                f"{type(v).__name__}")
            rows = v.shape[0] if v.shape else 0
            if rows != off[-1]:
                raise ValueError(f"FederatedData: feature {k!r} has {rows} rows but the offsets "
                                 f"count {int(off[-1])} examples")

    # -- size -------------------------------------------------------------------------------
    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    @property
    def num_examples(self) -> np.ndarray:
        """int64[N], the number of examples each client holds."""
        return np.diff(self.offsets)

    @property
    def total_examples(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.features.values())

    def __len__(self) -> int:
        return self.num_clients

    def __repr__(self) -> str:
        cols = ", ".join(f"{k}: {v.dtype}{list(v.shape[1:])}" for k, v in self.features.items())
        return (
            f"FederatedData({self.num_clients} clients, {self.total_examples} examples; {cols})"
        )

    # -- access -----------------------------------------------------------------------------
    def index_of(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Positions of the named clients; raises KeyError naming any unknown id."""
        if isinstance(ids, str):
            ids = [ids]
        lookup = {cid: i for i, cid in enumerate(self.client_ids.tolist())}
        missing = [c for c in ids if c not in lookup]
        if missing:
            raise KeyError(f"unknown client id(s): {missing[:5]}")
        return np.array([lookup[c] for c in ids], dtype=np.int64)

    def client(self, index: int) -> Features:
        """One client's examples, by position (`get_clients` takes ids)."""
        (index,) = self._positions([index], "client")
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return {k: v[lo:hi] for k, v in self.features.items()}

    def get_clients(self, ids: Sequence[str]) -> dict[str, Features]:
        """Examples of the named clients, as {client id: features}."""
        ids = [ids] if isinstance(ids, str) else ids
        return {cid: self.client(int(i)) for cid, i in zip(ids, self.index_of(ids), strict=True)}

    def _positions(self, indices, where: str) -> np.ndarray:
        """Client positions as int64, or an error saying what was passed instead."""
        arr = np.asarray(indices)
        if arr.dtype.kind in "USO":
            raise TypeError(f"{where} takes client positions (integers); for client ids use "
                            f"data.index_of(ids) or data.get_clients(ids)")
        if arr.dtype == bool:
            if arr.shape != (self.num_clients,):
                raise ValueError(f"{where}: a boolean mask needs one entry per client "
                                 f"({self.num_clients}), got shape {arr.shape}")
            return np.flatnonzero(arr)
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"{where} takes client positions (integers), got dtype {arr.dtype}")
        arr = arr.astype(np.int64).reshape(-1)
        bad = arr[(arr < 0) | (arr >= self.num_clients)]
        if bad.size:
            raise IndexError(f"{where}: client position {int(bad[0])} is out of range for "
                             f"{self.num_clients} clients")
        return arr

    def subset(self, indices: Sequence[int] | np.ndarray) -> FederatedData:
        """A new population holding the clients at `indices` (positions, in that order, or a
        boolean mask over the clients)."""
        indices = self._positions(indices, "subset")
        rows = rows_of(self.offsets, indices)
        counts = self.num_examples[indices]
        return FederatedData(
            self.client_ids[indices],
            {k: v[rows] for k, v in self.features.items()},
            np.concatenate([[0], np.cumsum(counts)]),
        )

    def pooled(self) -> Features:
        """All examples of all clients, as one centralized data set."""
        return dict(self.features)

    def split(self, test_fraction: float, *, seed: int = 0) -> tuple[FederatedData,
                                                                      FederatedData]:
        """Splits every client's examples at random into (train, test).

        A client with n examples puts `round(test_fraction * n)` of them in test, but always
        keeps at least one in train; clients left with no test example are not in the test
        population. Seeded and vectorized: no per-client Python objects.
        """
        if not isinstance(test_fraction, float | int) or not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        n = self.num_examples
        n_test = np.minimum(np.round(test_fraction * n).astype(np.int64), n - 1)
        owner = np.repeat(np.arange(self.num_clients), n)
        order = np.lexsort((np.random.default_rng(seed).random(len(owner)), owner))
        rank = np.empty(len(owner), np.int64)
        rank[order] = np.arange(len(owner)) - np.repeat(self.offsets[:-1], n)[order]
        is_test = rank < n_test[owner]
        return self._select_rows(~is_test, owner), self._select_rows(is_test, owner)

    def _select_rows(self, mask: np.ndarray, owner: np.ndarray) -> FederatedData:
        """The population of the rows in `mask`, without the clients left with none."""
        counts = np.bincount(owner[mask], minlength=self.num_clients)
        keep = counts > 0
        rows = np.nonzero(mask)[0]
        return FederatedData(self.client_ids[keep],
                             {k: v[rows] for k, v in self.features.items()},
                             np.concatenate([[0], np.cumsum(counts[keep])]))

    def map(self, fn, *, batch_size: int = 65_536, jit: bool = False) -> FederatedData:
        """Preprocesses every example in batches: `fn(features) -> features`, numpy on the host,
        or jitted on the device with `jit=True`. `fn` must keep one row per example; it may
        add, drop or convert features (e.g. decode bytes, normalize, tokenize).

        Example:
          >>> scaled = data.map(lambda f: {**f, "x": f["x"] / 255.0})   # doctest: +SKIP
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"map: batch_size must be an integer >= 1, got {batch_size!r}")
        if jit:
            import jax  # the data layer stays numpy-only unless asked

            compiled = jax.jit(fn)
            fn = lambda batch: jax.tree.map(np.asarray, compiled(batch))
        parts: list[Features] = []
        total = self.total_examples
        for lo in range(0, max(total, 1), batch_size):
            batch = {k: np.asarray(v[lo:lo + batch_size]) for k, v in self.features.items()}
            out = fn(batch)
            if not isinstance(out, Mapping):
                raise TypeError(f"map: fn must return a dict of features, got "
                                f"{type(out).__name__}"
                                + (" (does it end with a return?)" if out is None else ""))
            rows = min(batch_size, total - lo)
            bad = {k: np.shape(v) for k, v in out.items() if np.shape(v)[:1] != (rows,)}
            if bad:
                raise ValueError(f"map: fn must return one row per example ({rows} in this "
                                 f"batch); got shapes {bad}")
            parts.append(out)
        columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return FederatedData(self.client_ids, columns, self.offsets)


def rows_of(offsets: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The example rows of the clients at `indices`, concatenated in that order (vectorized)."""
    starts, counts = offsets[indices], offsets[indices + 1] - offsets[indices]
    total = int(counts.sum())
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + within


def _check_features(features: Mapping[str, np.ndarray], where: str) -> Features:
    if not isinstance(features, Mapping):
        raise TypeError(f"{where}: features must be a dict {{name: array}}, got "
                        f"{type(features).__name__}")
    if not features:
        raise ValueError(f"{where}: no features given")
    out = {}
    for k, v in features.items():
        try:
            out[k] = np.asarray(v)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"{where}: feature {k!r} is ragged (its examples differ in "
                             f"shape: {e}); pad them to one shape first") from None
    for k, v in out.items():
        if v.ndim == 0:
            raise ValueError(f"{where}: feature {k!r} is a scalar ({v!r}); every feature needs "
                             "one row per example, an array of shape (num_examples, ...)")
    lengths = {k: v.shape[0] for k, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"{where}: features have mismatched lengths {lengths}; every feature needs one row "
            "per example"
        )
    for k, v in out.items():
        if v.dtype == object:
            raise ValueError(f"{where}: feature {k!r} has dtype object; use numeric arrays")
        if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
            bad = np.unique(np.nonzero(~np.isfinite(v.reshape(len(v), -1)))[0])
            raise ValueError(
                f"{where}: feature {k!r} has non-finite values (NaN or inf) in "
                f"{len(bad)} example(s), first at example {int(bad[0])}"
            )
    return out


def from_arrays(
    client_ids: Sequence | np.ndarray, features: Mapping[str, np.ndarray]
) -> FederatedData:
    """Builds a population from flat arrays plus the client id of every example.

    Example:
      >>> data = from_arrays(["a", "b", "a"], {"x": np.zeros((3, 2)), "y": np.array([0, 1, 2])})
      >>> data.num_examples.tolist()
      [2, 1]

    Clients are ordered by first appearance; each client's examples keep their input order.
    """
    features = _check_features(features, "from_arrays")
    if not isinstance(client_ids, np.ndarray) or client_ids.dtype == object:
        kinds = {type(c) for c in client_ids}
        if len(kinds) > 1:  # np.asarray would turn 1 and "1" into one client
            names = sorted(t.__name__ for t in kinds)
            raise ValueError(f"from_arrays: client_ids mix types ({', '.join(names)}), so "
                             "ids such as 1 and '1' would name one client; give every id the "
                             "same type")
    client_ids = np.asarray(client_ids)
    n = next(iter(features.values())).shape[0]
    if client_ids.shape != (n,):
        raise ValueError(
            f"from_arrays: client_ids has shape {client_ids.shape}, expected ({n},): one client "
            "id per example"
        )
    if n == 0:
        raise ValueError("from_arrays: no examples given")
    uniq, first, inverse = np.unique(client_ids, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    client_of_row = rank[inverse]
    order = np.argsort(client_of_row, kind="stable")
    counts = np.bincount(client_of_row, minlength=len(uniq))
    ids = uniq[np.argsort(first, kind="stable")].astype(str)
    return FederatedData(
        ids, {k: v[order] for k, v in features.items()}, np.concatenate([[0], np.cumsum(counts)])
    )


def from_client_dict(clients: Mapping[str, Mapping[str, np.ndarray]]) -> FederatedData:
    """Builds a population from {client id: {feature: array}}.

    Clients with zero examples are dropped with a warning; if every client is empty this is an
    error.
    """
    if not isinstance(clients, Mapping):
        raise TypeError(f"from_client_dict takes a dict {{client id: {{feature: array}}}}, got "
                        f"{type(clients).__name__}")
    if not clients:
        raise ValueError("from_client_dict: no clients given")
    keys = None
    kept, empty = [], []
    spec: dict = {}  # feature -> (dtype kind, example shape, dtype)
    named: dict[str, object] = {}
    for cid, feats in clients.items():
        if named.setdefault(str(cid), cid) is not cid:  # dict keys 1 and "1" print alike
            raise ValueError(f"from_client_dict: client ids {named[str(cid)]!r} and {cid!r} "
                             f"are different keys but both name client {str(cid)!r}; give "
                             "every id the same type")
        feats = _check_features(feats, f"client {cid!r}")
        if keys is None:
            keys = sorted(feats)
        elif sorted(feats) != keys:
            raise ValueError(f"client {cid!r} has features {sorted(feats)}, expected {keys}")
        check_like_earlier(f"client {cid!r}", feats, spec)
        n = next(iter(feats.values())).shape[0]
        (kept if n else empty).append((str(cid), feats, n))
    if not kept:
        raise ValueError(f"from_client_dict: all {len(empty)} clients have zero examples")
    if empty:
        names = [c for c, _, _ in empty]
        warnings.warn(
            f"skipping {len(empty)} client(s) with zero examples: {names[:5]}",
            stacklevel=2,
        )
    columns = {k: np.concatenate([f[k] for _, f, _ in kept]) for k in keys}
    counts = np.array([n for _, _, n in kept], dtype=np.int64)
    return FederatedData(
        np.array([c for c, _, _ in kept]), columns, np.concatenate([[0], np.cumsum(counts)])
    )


def check_like_earlier(
    where: str, features: Features, spec: dict[str, tuple[str, tuple[int, ...], str]]
) -> None:
    """Raises unless each feature has the dtype kind and example shape of earlier clients'
    (recorded in `spec`, which this fills): loaders build columns client by client."""
    for name, column in features.items():
        if not len(column):
            continue  # An empty client has no shape to compare, and is dropped later.
        got = (column.dtype.kind, column.shape[1:], str(column.dtype))
        want = spec.setdefault(name, got)
        if got[:2] != want[:2]:
            raise ValueError(
                f"{where}: feature {name!r} has {got[2]} examples of shape {got[1]}, but "
                f"earlier clients have {want[2]} examples of shape {want[1]}: every client's "
                "feature needs the same example shape and kind of dtype"
            )


def check_labels(data: FederatedData, key: str, num_classes: int, what: str = "class") -> None:
    """Raises if `data[key]` holds labels outside [0, num_classes) (or, with `what="token"`,
    token ids outside the vocabulary), or is not integer.

    A lazily read column (a SQLite-backed population) is not read here: `check_rows` checks it
    cohort by cohort as the simulation reads it.
    """
    if key not in data.features:
        kind = {"class": "label", "token": "input"}.get(what, what)
        raise ValueError(f"data has no {kind} feature {key!r}; features: "
                         f"{sorted(data.features)}")
    y = data.features[key]
    if not np.issubdtype(y.dtype, np.integer):
        _check_label_dtype(data, y, key, num_classes, what)
    if isinstance(y, np.ndarray):
        _check_label_values(data, y, np.arange(len(y)), key, num_classes, what)


def _check_label_dtype(data, y, key, num_classes, what) -> None:
    problem = (f"feature {key!r} has dtype {y.dtype}, but {key!r} must be integer {what} ids in "
               f"[0, {num_classes})")
    values = np.asarray(y) if isinstance(y, np.ndarray) else None
    if values is None or values.dtype.kind not in "fb":
        raise ValueError(f"{problem}; convert it, e.g. data.map(lambda f: {{**f, {key!r}: "
                         f"f[{key!r}].astype(np.int32)}})")
    whole = values == np.round(values) if values.dtype.kind == "f" else np.ones(len(values), bool)
    if whole.all():
        raise ValueError(f"{problem}. Its values are whole numbers, so casting is safe: "
                         f"data.map(lambda f: {{**f, {key!r}: f[{key!r}].astype(np.int32)}})")
    bad = int(np.flatnonzero(~whole)[0])
    row = bad // max(1, values[0].size)
    raise ValueError(f"{problem}; it holds non-integer values such as {values.flat[bad]:g} "
                     f"(client {_client_of_row(data, row)!r}): a regression target or soft "
                     "labels need a model with a loss of their own (fs.models.Model)")


def check_rows(data: FederatedData, rows: np.ndarray, columns: Features,
               label: tuple[str, int] | None) -> None:
    """Checks examples read from a population as they are read (non-finite values, labels out
    of range): `columns[k][:len(rows)]` holds the feature `k` of population rows `rows`."""
    for k, v in columns.items():
        v = v[: len(rows)]
        if np.issubdtype(v.dtype, np.floating):
            ok = np.isfinite(v.reshape(len(v), -1)).all(axis=1)
            if not ok.all():
                client = _client_of_row(data, rows[np.argmin(ok)])
                raise ValueError(f"feature {k!r} has non-finite values (NaN or inf) in "
                                 f"{int((~ok).sum())} example(s) read this round, first of "
                                 f"client {client!r}")
    if label is not None:
        key, num_classes = label
        _check_label_values(data, columns[key][: len(rows)], rows, key, num_classes)


def _client_of_row(data: FederatedData, row: int) -> str:
    return str(data.client_ids[int(np.searchsorted(data.offsets, row, side="right") - 1)])


def _check_label_values(data, y, rows, key, num_classes, what="class") -> None:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        flat = y.reshape(len(y), -1)  # sequence labels: [examples, tokens]
        bad = np.flatnonzero((flat < 0) | (flat >= num_classes))
        kinds = {"class": "classes", "token": "token ids in its vocabulary"}.get(what,
                                                                                f"{what} ids")
        noun = {"class": "labels", "token": "token ids"}.get(what, f"{what} ids")
        raise ValueError(
            f"{noun} out of range: feature {key!r} has "
            f"{len(bad)} value(s) outside [0, {num_classes}) (e.g. {int(flat.flat[bad[0]])} for "
            f"client {_client_of_row(data, rows[bad[0] // flat.shape[1]])!r}); the "
            f"{'model' if what in ('class', 'token') else 'algorithm'} has {num_classes} {kinds}"
        )
