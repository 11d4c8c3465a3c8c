"""FedProx Synthetic(alpha, beta) data (Li et al., 2020, "Federated Optimization in
Heterogeneous Networks"), generated in-process.

Per client k: u_k ~ N(0, alpha^2); W_k ~ N(u_k, 1) of shape (60, 10), b_k ~ N(u_k, 1);
B_k ~ N(0, beta^2); v_k ~ N(B_k, 1) in R^60; x ~ N(v_k, diag(j^-1.2)); y = argmax(x W_k + b_k);
examples per client int(lognormal(4, 2)) + 50. The IID variant draws one W, b ~ N(0, 1) and
v_k = 0. Alpha controls how much the clients' models differ, beta how much their inputs do.
"""

from __future__ import annotations

import numpy as np

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
    seed: int = 0,
) -> tuple[FederatedData, FederatedData]:
    """Generates the FedProx Synthetic(alpha, beta) population; returns (train, test).

    Each client's examples are split at random into train and test (`test_fraction`, at least
    one of each), as in the FedProx code. `max_examples_per_client` truncates the log-normal
    tail of client sizes before the split.

    Example:
      >>> train, test = synthetic(1.0, 1.0, num_clients=10, seed=0)
      >>> train.num_clients
      10
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if max_examples_per_client is not None and max_examples_per_client < 2:
        raise ValueError(
            f"max_examples_per_client must be >= 2 (every client needs a train and a test "
            f"example), got {max_examples_per_client}")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
    if max_examples_per_client is not None:
        sizes = np.minimum(sizes, max_examples_per_client)
    cov_diag = np.arange(1, NUM_FEATURES + 1, dtype=np.float64) ** -1.2

    if iid:
        w_global = rng.normal(0, 1, (NUM_FEATURES, NUM_CLASSES))
        b_global = rng.normal(0, 1, NUM_CLASSES)

    xs, ys, train_mask = [], [], []
    for k in range(num_clients):
        if iid:
            w, b, v = w_global, b_global, np.zeros(NUM_FEATURES)
        else:
            u = rng.normal(0, alpha)
            w = rng.normal(u, 1, (NUM_FEATURES, NUM_CLASSES))
            b = rng.normal(u, 1, NUM_CLASSES)
            v = rng.normal(rng.normal(0, beta), 1, NUM_FEATURES)
        n = int(sizes[k])
        x = v + rng.normal(size=(n, NUM_FEATURES)) * np.sqrt(cov_diag)
        y = np.argmax(x @ w + b, axis=1)
        n_test = min(max(1, int(round(test_fraction * n))), n - 1)
        is_train = np.ones(n, dtype=bool)
        is_train[rng.permutation(n)[:n_test]] = False
        xs.append(x.astype(np.float32))
        ys.append(y.astype(np.int32))
        train_mask.append(is_train)

    ids = np.array([f"synthetic_{k:07d}" for k in range(num_clients)])

    def build(select_train: bool) -> FederatedData:
        keep = [m if select_train else ~m for m in train_mask]
        counts = np.array([int(m.sum()) for m in keep], dtype=np.int64)
        return FederatedData(
            ids,
            {
                "x": np.concatenate([x[m] for x, m in zip(xs, keep, strict=True)]),
                "y": np.concatenate([y[m] for y, m in zip(ys, keep, strict=True)]),
            },
            np.concatenate([[0], np.cumsum(counts)]),
        )

    return build(True), build(False)
