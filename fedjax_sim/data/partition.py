"""Partitioners: federate any array data set, plus statistics and a plot of the result.

Input is a dict of equal-length numpy arrays (one of them the label column) or a Hugging Face
`datasets.Dataset`. Every partitioner is seeded (same seed, same partition), assigns every
example to exactly one client, never makes an empty client, and returns a `FederatedData`
whose clients are named "client_00000", "client_00001", ... (except `natural`, which keeps the
data set's own ids). Within a client, examples keep their order in the input.

Example:
  >>> import numpy as np
  >>> arrays = {"x": np.zeros((100, 2)), "y": np.arange(100) % 10}
  >>> data = dirichlet(arrays, num_clients=5, alpha=0.5, seed=0)
  >>> int(data.num_examples.sum())
  100
  >>> statistics(data)["label_histogram"].shape
  (5, 10)
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedjax_sim.data.federated import FederatedData, _check_features, check_labels, from_arrays

# Re-draws `dirichlet` makes before giving up on giving every client `min_size` examples.
MAX_DIRICHLET_TRIES = 1000


def iid(features: Any, num_clients: int, *, seed: int = 0) -> FederatedData:
    """Shuffles the examples and deals them out evenly (client sizes differ by at most one).

    Args:
      features: a dict of equal-length arrays, or a Hugging Face `datasets.Dataset`.
      num_clients: number of clients, at most the number of examples.
      seed: the partition's seed.
    """
    columns, n = _columns(features, "iid")
    _check_num_clients(num_clients, n, "iid")
    _check_seed(seed, "iid")
    rng = np.random.default_rng(seed)
    return _assemble(columns, rng.permutation(np.arange(n) % num_clients), num_clients)


def dirichlet(
    features: Any,
    num_clients: int,
    alpha: float,
    *,
    label: str = "y",
    seed: int = 0,
    min_size: int = 1,
) -> FederatedData:
    """Label skew: each class is split over the clients in proportions drawn from Dir(alpha).

    Hsu et al. (2019), "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification", draw each client's class mix from a Dirichlet; this is the per-class
    form of that scheme used by Yurochkin et al. (2019) and Li et al. (2022), "Federated Learning
    on Non-IID Data Silos" (NIID-Bench): for every class c, p_c ~ Dir(alpha * 1_N) and client i
    gets a fraction p_c[i] of class c's (shuffled) examples. Small alpha (0.1) gives clients a
    few dominant classes and very unequal sizes; large alpha (100) approaches IID.

    If a draw leaves some client with fewer than `min_size` examples, the whole partition is
    re-drawn, as in NIID-Bench, up to `MAX_DIRICHLET_TRIES` times; then it raises, since the
    settings make such a client nearly certain (lower `min_size`, raise `alpha` or use fewer
    clients).

    Args:
      features: a dict of equal-length arrays, or a Hugging Face `datasets.Dataset`.
      num_clients: number of clients.
      alpha: Dirichlet concentration, > 0.
      label: the name of the (1-D) label column.
      seed: the partition's seed.
      min_size: the fewest examples a client may hold, >= 1.
    """
    columns, n = _columns(features, "dirichlet")
    if not isinstance(alpha, int | float) or not 0 < alpha < np.inf:
        raise ValueError(f"dirichlet: alpha must be a finite number > 0 (large is near IID; "
                         f"iid() is the limit), got {alpha!r}")
    _check_seed(seed, "dirichlet")
    if min_size < 1:
        raise ValueError(f"dirichlet: min_size must be >= 1, got {min_size}")
    _check_num_clients(num_clients, n // min_size, f"dirichlet with min_size={min_size}")
    codes, num_classes = _label_codes(columns, label, "dirichlet")
    rng = np.random.default_rng(seed)
    by_class = [np.nonzero(codes == c)[0] for c in range(num_classes)]
    assignment = np.empty(n, dtype=np.int64)
    for _ in range(MAX_DIRICHLET_TRIES):
        for rows in by_class:
            p = rng.dirichlet(np.full(num_clients, alpha))
            # Client i takes the class's shuffled rows between cumulative proportions i-1 and i.
            bounds = np.concatenate([[0], (np.cumsum(p)[:-1] * len(rows)).astype(np.int64),
                                     [len(rows)]])
            assignment[rng.permutation(rows)] = np.repeat(np.arange(num_clients), np.diff(bounds))
        if np.bincount(assignment, minlength=num_clients).min() >= min_size:
            return _assemble(columns, assignment, num_clients)
    raise ValueError(
        f"dirichlet: no draw in {MAX_DIRICHLET_TRIES} gave all {num_clients} clients at least "
        f"{min_size} example(s) with alpha={alpha} and {n} examples; lower min_size, raise "
        "alpha, or use fewer clients"
    )


def quantity_skew(
    features: Any,
    num_clients: int,
    *,
    distribution: str = "lognormal",
    sigma: float = 1.0,
    exponent: float = 1.5,
    seed: int = 0,
    min_size: int = 1,
) -> FederatedData:
    """Quantity skew: IID examples, but client sizes drawn from a heavy-tailed distribution.

    Each client gets a weight w_i, log-normal (w = exp(N(0, sigma^2)), as the client sizes of
    FedProx's Synthetic data, Li et al. 2020) or power law (Pareto, P(w > t) = t^-exponent for
    t >= 1, as FedProx's MNIST split). Client i then holds `min_size` examples plus a share of
    the rest proportional to w_i (rounded by largest remainder, so sizes sum to the data set).

    Args:
      features: a dict of equal-length arrays, or a Hugging Face `datasets.Dataset`.
      num_clients: number of clients.
      distribution: "lognormal" or "power_law".
      sigma: log-normal shape, > 0; larger is more skewed.
      exponent: power-law tail exponent, > 0; smaller is more skewed.
      seed: the partition's seed.
      min_size: the fewest examples a client may hold, >= 1.
    """
    columns, n = _columns(features, "quantity_skew")
    _check_seed(seed, "quantity_skew")
    if min_size < 1:
        raise ValueError(f"quantity_skew: min_size must be >= 1, got {min_size}")
    _check_num_clients(num_clients, n // min_size, f"quantity_skew with min_size={min_size}")
    rng = np.random.default_rng(seed)
    if distribution == "lognormal":
        if not sigma > 0:
            raise ValueError(f"quantity_skew: sigma must be > 0, got {sigma}")
        weights = rng.lognormal(0.0, sigma, num_clients)
    elif distribution == "power_law":
        if not exponent > 0:
            raise ValueError(f"quantity_skew: exponent must be > 0, got {exponent}")
        weights = rng.pareto(exponent, num_clients) + 1.0
        if not np.isfinite(weights.sum()):
            raise ValueError(f"quantity_skew: exponent {exponent} is so small that the power "
                             "law's draws overflow; use an exponent of 0.1 or more")
    else:
        raise ValueError(
            f"quantity_skew: distribution must be 'lognormal' or 'power_law', got {distribution!r}"
        )
    sizes = min_size + _apportion(weights, n - min_size * num_clients)
    return _assemble(columns, rng.permutation(np.repeat(np.arange(num_clients), sizes)),
                     num_clients)


def shards(
    features: Any,
    num_clients: int,
    shards_per_client: int = 2,
    *,
    label: str = "y",
    seed: int = 0,
) -> FederatedData:
    """The pathological non-IID split of McMahan et al. (2017), "Communication-Efficient Learning
    of Deep Networks from Decentralized Data": sort by label, cut into shards, deal each client
    `shards_per_client` shards at random.

    Unlike the paper's cut of the sorted data into equal runs, shards here never straddle two
    classes: each class is cut into its own shards (their number proportional to the class's
    size, at least one, so shard sizes are as even as possible). So a client holds at most
    `shards_per_client` classes (fewer when two of its shards come from the same class). With
    MNIST's 10 near-equal classes, 100 clients and 2 shards each, this matches the paper.

    Args:
      features: a dict of equal-length arrays, or a Hugging Face `datasets.Dataset`.
      num_clients: number of clients.
      shards_per_client: shards per client, and so the most classes a client can hold.
      label: the name of the (1-D) label column.
      seed: the partition's seed.
    """
    columns, n = _columns(features, "shards")
    _check_seed(seed, "shards")
    if isinstance(shards_per_client, bool) or not isinstance(shards_per_client, int | np.integer):
        raise TypeError(f"shards: shards_per_client must be an integer, got {shards_per_client!r}")
    if shards_per_client < 1:
        raise ValueError(f"shards: shards_per_client must be >= 1, got {shards_per_client}")
    _check_num_clients(num_clients, n // shards_per_client,
                       f"shards with shards_per_client={shards_per_client}")
    codes, num_classes = _label_codes(columns, label, "shards")
    num_shards = num_clients * shards_per_client
    if num_shards < num_classes:
        raise ValueError(
            f"shards: {num_clients} clients x {shards_per_client} shards = {num_shards} shards "
            f"cannot cover the {num_classes} classes without leaving examples out; use more "
            "clients or shards_per_client"
        )
    counts = np.bincount(codes, minlength=num_classes)
    rng = np.random.default_rng(seed)
    # Shard s goes to client client_of_shard[s]: a random deal of shards_per_client each.
    client_of_shard = rng.permutation(np.arange(num_shards) // shards_per_client)
    assignment = np.empty(n, dtype=np.int64)
    first_shard = 0
    for c, k in enumerate(_shards_per_class(counts, num_shards)):
        # The class's shuffled rows cut into k near-equal consecutive shards.
        shard = first_shard + np.arange(counts[c]) * k // counts[c]
        assignment[rng.permutation(np.nonzero(codes == c)[0])] = client_of_shard[shard]
        first_shard += k
    return _assemble(columns, assignment, num_clients)


def natural(features: Any, id_column: str) -> FederatedData:
    """Partitions by an existing id column (e.g. writer or user id): one client per distinct id.

    The client ids are the column's values as strings (not "client_00000"), so clients can be
    matched to the source; the id column itself is dropped from the features. Clients are
    ordered by first appearance and keep their examples' input order.

    Args:
      features: a dict of equal-length arrays, or a Hugging Face `datasets.Dataset`.
      id_column: the name of the column holding each example's client id.
    """
    columns, _ = _columns(features, "natural")
    if id_column not in columns:
        raise ValueError(
            f"natural: no id column {id_column!r}; features: {sorted(columns)}"
        )
    ids = columns.pop(id_column)
    if ids.ndim != 1:
        raise ValueError(f"natural: id column {id_column!r} must be 1-D, got shape {ids.shape}")
    if not columns:
        raise ValueError(f"natural: no features besides the id column {id_column!r}")
    return from_arrays(ids.astype(str), columns)


def statistics(
    data: FederatedData, label: str = "y", num_classes: int | None = None
) -> dict[str, Any]:
    """Per-client sizes and label histograms of a population, and summary numbers.

    The label skew of client i is the total-variation distance of its label distribution q_i
    from the pooled one p, 0.5 * sum_c |q_i[c] - p[c]|, in [0, 1] (0: same mix as the whole
    data set). It equals the earth mover's distance between the two under the 0/1 ground
    distance between classes, the natural one for unordered labels.

    Args:
      data: the population.
      label: the name of the integer label column, values in [0, num_classes).
      num_classes: number of classes; default the largest label plus one.

    Returns:
      A dict with "sizes" int[N], "label_histogram" int[N, C], "classes_per_client" int[N],
      "label_tv" float[N] (the label skew above), the floats "size_mean", "size_std",
      "mean_classes_per_client", "mean_label_tv", and the ints "size_min", "size_max",
      "num_clients", "num_examples", "num_classes".
    """
    if label not in data.features:
        raise ValueError(f"statistics: no label feature {label!r}; features: "
                         f"{sorted(data.features)}")
    y = data.features[label]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"statistics: label {label!r} must be a 1-D integer array, got "
                         f"{y.dtype}{list(y.shape)}")
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size else 0
    check_labels(data, label, num_classes)
    sizes = data.num_examples
    client_of_row = np.repeat(np.arange(data.num_clients), sizes)
    hist = np.bincount(client_of_row * num_classes + y, minlength=data.num_clients * num_classes)
    hist = hist.reshape(data.num_clients, num_classes)
    # Empty clients (possible in a hand-built FederatedData) get an all-zero distribution.
    q = hist / np.maximum(sizes, 1)[:, None]
    p = hist.sum(0) / max(int(sizes.sum()), 1)
    tv = 0.5 * np.abs(q - p).sum(1)
    classes = (hist > 0).sum(1)
    return {
        "num_clients": data.num_clients,
        "num_examples": int(sizes.sum()),
        "num_classes": num_classes,
        "sizes": sizes,
        "label_histogram": hist,
        "classes_per_client": classes,
        "label_tv": tv,
        "size_mean": float(sizes.mean()),
        "size_std": float(sizes.std()),
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
        "mean_classes_per_client": float(classes.mean()),
        "mean_label_tv": float(tv.mean()),
    }


def plot_statistics(
    data: FederatedData,
    label: str = "y",
    num_classes: int | None = None,
    *,
    max_clients: int = 50,
    figsize: tuple[float, float] = (12.0, 5.0),
):
    """Plots client sizes (histogram) and label mixes (stacked bars) of a population.

    Needs matplotlib (`pip install matplotlib`). Returns a `matplotlib.figure.Figure` built
    without pyplot, so it leaves no global figure state and a notebook shows it once, as the
    cell's value; save it with `fig.savefig(path)`.

    Args:
      data: the population.
      label: the name of the integer label column.
      num_classes: number of classes; default the largest label plus one.
      max_clients: the label-mix panel shows the first this many clients.
      figsize: figure size in inches.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_statistics needs matplotlib: pip install matplotlib") from e
    stats = statistics(data, label, num_classes)
    fig = Figure(figsize=figsize, layout="constrained")
    ax_size, ax_mix = fig.subplots(1, 2, width_ratios=[1, 1.4])

    ax_size.hist(stats["sizes"], bins=min(50, max(10, data.num_clients // 5)), color="tab:blue")
    ax_size.set_xlabel("examples per client")
    ax_size.set_ylabel("clients")
    ax_size.set_title(
        f"{data.num_clients} clients: size mean {stats['size_mean']:.1f}, "
        f"min {stats['size_min']:.0f}, max {stats['size_max']:.0f}"
    )

    shown = min(max_clients, data.num_clients)
    hist = stats["label_histogram"][:shown]
    mix = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    c = stats["num_classes"]
    cmap = colormaps["tab10" if c <= 10 else "tab20" if c <= 20 else "viridis"]
    left = np.zeros(shown)
    rows = np.arange(shown)
    for k in range(c):
        ax_mix.barh(rows, mix[:, k], left=left, height=1.0, label=str(k),
                    color=cmap(k if c <= 20 else k / max(c - 1, 1)))
        left += mix[:, k]
    ax_mix.set_xlim(0, 1)
    ax_mix.set_ylim(shown - 0.5, -0.5)  # first client at the top
    ax_mix.set_xlabel("fraction of the client's examples")
    ax_mix.set_ylabel("client")
    ax_mix.set_title(
        f"label mix, first {shown} clients: {stats['mean_classes_per_client']:.1f} classes/client, "
        f"mean TV from global {stats['mean_label_tv']:.2f}"
    )
    if c <= 20:
        ax_mix.legend(title="label", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    return fig


# -- helpers ---------------------------------------------------------------------------------


def _columns(features: Any, where: str) -> tuple[dict[str, np.ndarray], int]:
    """The input as validated numpy columns, and its number of examples."""
    if not isinstance(features, Mapping):
        features = _from_hf_dataset(features, where)
    columns = _check_features(features, where)
    return columns, next(iter(columns.values())).shape[0]


def _from_hf_dataset(features: Any, where: str) -> dict[str, np.ndarray]:
    # Imported only here: `datasets` is heavy and optional.
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is None or not isinstance(features, datasets.Dataset):
        raise TypeError(
            f"{where}: expected a dict of numpy arrays or a datasets.Dataset, got "
            f"{type(features).__name__}"
        )
    columns = dict(features.with_format("numpy")[:])
    # Text columns (e.g. a user id) come back as object arrays of str; make them numpy strings.
    return {k: v.astype(str) if v.dtype == object and all(isinstance(e, str) for e in v) else v
            for k, v in columns.items()}


def _check_seed(seed: Any, where: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"{where}: seed must be a non-negative integer (the partition is "
                         f"drawn from it), got {seed!r}")


def _check_num_clients(num_clients: int, most: int, where: str) -> None:
    if not isinstance(num_clients, int | np.integer) or num_clients < 1:
        raise ValueError(f"{where}: num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > most:
        raise ValueError(
            f"{where}: {num_clients} clients is more than the examples allow (at most {most})"
        )


def _label_codes(columns: dict[str, np.ndarray], label: str, where: str) -> tuple[np.ndarray, int]:
    """Each example's class as 0..C-1 (labels of any dtype, in sorted order), and C."""
    if label not in columns:
        raise ValueError(f"{where}: no label column {label!r}; features: {sorted(columns)}")
    y = columns[label]
    if y.ndim != 1:
        raise ValueError(f"{where}: label column {label!r} must be 1-D, got shape {y.shape}")
    if y.dtype.kind == "f" and not np.all(y == np.round(y)):
        raise ValueError(f"{where}: label column {label!r} holds non-integer values (e.g. "
                         f"{y[np.argmax(y != np.round(y))]:g}): a label skew needs class labels")
    classes, codes = np.unique(y, return_inverse=True)
    return codes.reshape(-1), len(classes)


def _apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Splits `total` into integers proportional to `weights` (largest-remainder method)."""
    ideal = weights / weights.sum() * total
    out = np.floor(ideal).astype(np.int64)
    out[np.argsort(out - ideal, kind="stable")[: total - int(out.sum())]] += 1
    return out


def _shards_per_class(counts: np.ndarray, num_shards: int) -> list[int]:
    """Shards per class: one each, then each next shard to the class whose shards are largest.

    This (D'Hondt) rule makes shard sizes as even as possible; with at least one example per
    shard overall, no class gets more shards than examples.
    """
    k = [1] * len(counts)
    heap = [(-int(n), c) for c, n in enumerate(counts)]
    heapq.heapify(heap)
    for _ in range(num_shards - len(counts)):
        _, c = heapq.heappop(heap)
        k[c] += 1
        heapq.heappush(heap, (-counts[c] / k[c], c))
    return k


def _assemble(columns: dict[str, np.ndarray], assignment: np.ndarray,
              num_clients: int) -> FederatedData:
    """Builds the population where example j belongs to client `assignment[j]`.

    A stable sort keeps each client's examples in input order.
    """
    order = np.argsort(assignment, kind="stable")
    sizes = np.bincount(assignment, minlength=num_clients)
    width = max(5, len(str(num_clients - 1)))
    ids = np.array([f"client_{i:0{width}d}" for i in range(num_clients)])
    return FederatedData(
        ids, {k: v[order] for k, v in columns.items()}, np.concatenate([[0], np.cumsum(sizes)])
    )
