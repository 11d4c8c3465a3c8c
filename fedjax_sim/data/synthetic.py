"""FedProx Synthetic(alpha, beta) data (Li et al., 2020, "Federated Optimization in
Heterogeneous Networks"), generated in-process.

Per client k: u_k ~ N(0, alpha^2); W_k ~ N(u_k, 1) of shape (60, 10), b_k ~ N(u_k, 1);
B_k ~ N(0, beta^2); v_k ~ N(B_k, 1) in R^60; x ~ N(v_k, diag(j^-1.2)); y = argmax(x W_k + b_k);
examples per client int(lognormal(4, 2)) + 50. The IID variant draws one W, b ~ N(0, 1) and
v_k = 0. Alpha controls how much the clients' models differ, beta how much their inputs do.
"""

from __future__ import annotations

import numpy as np

from fedjax_sim.checks import check_integer
from fedjax_sim.data.federated import FederatedData

NUM_FEATURES = 60
NUM_CLASSES = 10


def synthetic(
    alpha: float = 1.0,
    beta: float = 1.0,
    *,
    num_clients: int = 1000,
    iid: bool = False,
    test_fraction: float = 0.1,
    max_examples_per_client: int | None = None,
    num_examples: int | np.ndarray | None = None,
    seed: int = 0,
) -> tuple[FederatedData, FederatedData]:
    """Generates the FedProx Synthetic(alpha, beta) population; returns (train, test).

    Each client's examples are split at random into train and test (`test_fraction`, at least
    one of each), as in the FedProx code. `max_examples_per_client` truncates the log-normal
    tail of client sizes before the split; `num_examples` (one number, or one per client)
    replaces the log-normal draw, e.g. for a population of a million clients with a few
    examples each. Generation is vectorized over blocks of clients: no per-client Python
    objects, so a million clients take seconds.

    Example:
      >>> train, test = synthetic(1.0, 1.0, num_clients=10, seed=0)
      >>> train.num_clients
      10
    """
    num_clients = check_integer("num_clients", num_clients, 1)
    seed = check_integer("seed", seed, 0)
    for name, value in (("alpha", alpha), ("beta", beta)):
        # Larger spreads overflow float32 features (1e39 gave inf inputs and a dead run).
        if not isinstance(value, int | float) or not 0 <= value <= 1e6:
            raise ValueError(f"{name} must be a number in [0, 1e6] (a standard deviation of "
                             f"the clients' {'models' if name == 'alpha' else 'inputs'}), got "
                             f"{value!r}")
    if max_examples_per_client is not None:
        check_integer("max_examples_per_client", max_examples_per_client, 2)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if max_examples_per_client is not None and max_examples_per_client < 2:
        raise ValueError(
            f"max_examples_per_client must be >= 2 (every client needs a train and a test "
            f"example), got {max_examples_per_client}")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
    if num_examples is not None:
        given = np.asarray(num_examples)
        if given.dtype.kind not in "iu" or given.ndim > 1 or given.size not in (1, num_clients):
            raise ValueError(f"num_examples must be one integer or one per client ({num_clients}"
                             f"), got {given.dtype} of shape {given.shape}")
        sizes = np.broadcast_to(given.astype(np.int64), (num_clients,)).copy()
        if sizes.min() < 2:
            raise ValueError(f"num_examples must be >= 2 per client (a train and a test "
                             f"example), got a minimum of {sizes.min()}")
    if max_examples_per_client is not None:
        sizes = np.minimum(sizes, max_examples_per_client)
    global_model = ((rng.normal(0, 1, (NUM_FEATURES, NUM_CLASSES)), rng.normal(0, 1, NUM_CLASSES))
                    if iid else None)

    ends = np.cumsum(sizes)
    xs, ys, is_train = [], [], []
    lo = 0
    while lo < num_clients:
        # Blocks of at most ~100k examples and 20k clients bound the temporary memory.
        hi = int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + 100_000, side="right"))
        hi = min(max(hi, lo + 1), lo + 20_000, num_clients)
        x, y, train = _block(rng, sizes[lo:hi], alpha, beta, global_model, test_fraction)
        xs.append(x)
        ys.append(y)
        is_train.append(train)
        lo = hi
    x, y, train = np.concatenate(xs), np.concatenate(ys), np.concatenate(is_train)
    owner = np.repeat(np.arange(num_clients), sizes)
    ids = np.char.add("synthetic_", np.char.zfill(np.arange(num_clients).astype(str), 7))

    def build(mask: np.ndarray) -> FederatedData:
        counts = np.bincount(owner[mask], minlength=num_clients)
        return FederatedData(ids, {"x": x[mask], "y": y[mask]},
                             np.concatenate([[0], np.cumsum(counts)]))

    return build(train), build(~train)


def _block(rng, sizes, alpha, beta, global_model, test_fraction):
    """Examples of one block of clients: x f32[n, 60], y i32[n], is_train bool[n]."""
    k = len(sizes)
    owner = np.repeat(np.arange(k), sizes)
    if global_model is None:
        u = rng.normal(0, alpha, k)
        w = rng.normal(u[:, None, None], 1, (k, NUM_FEATURES, NUM_CLASSES))
        b = rng.normal(u[:, None], 1, (k, NUM_CLASSES))
        v = rng.normal(rng.normal(0, beta, k)[:, None], 1, (k, NUM_FEATURES))
    else:
        w_global, b_global = global_model
        v = np.zeros((k, NUM_FEATURES))
    x = v[owner] + rng.normal(size=(len(owner), NUM_FEATURES)) * _STD
    if global_model is None:
        # Sum over features one at a time: gathering w[owner] whole would need n x 600 floats.
        logits = b[owner]
        for d in range(NUM_FEATURES):
            logits += x[:, d:d + 1] * w[owner, d]
    else:
        logits = x @ w_global + b_global
    y = np.argmax(logits, axis=1)

    # Test examples: each client's n_test examples with the smallest random keys.
    n_test = np.minimum(np.maximum(1, np.round(test_fraction * sizes).astype(np.int64)),
                        sizes - 1)
    order = np.lexsort((rng.random(len(owner)), owner))
    starts = np.cumsum(sizes) - sizes
    rank = np.empty(len(owner), np.int64)
    rank[order] = np.arange(len(owner)) - starts[owner[order]]
    return x.astype(np.float32), y.astype(np.int32), rank >= n_test[owner]


_STD = np.arange(1, NUM_FEATURES + 1, dtype=np.float64) ** -0.6  # sqrt of diag(j^-1.2)
