"""FedProx (Li et al. 2020): FedAvg whose clients minimize f_i(w) + (mu / 2) ||w - w_t||^2, the
proximal term keeping heterogeneous clients' local work near the server's params w_t.

The local gradient is grad f_i(w) + mu (w - w_t) (`local_training`'s proximal term); mu = 0
is FedAvg. The paper's tolerance to partial local work (stragglers keep what they did) is the
engine's per-client step counts.

References: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.
"""

from __future__ import annotations

from fedjax_sim.algorithms.fedavg import fedopt
from fedjax_sim.checks import check_number


def fedprox(model, client_optimizer, server_optimizer=None, *, mu: float, **kwargs):
    """FedProx with proximal coefficient `mu` (>= 0); other arguments as `fedopt`'s.

    Example:
      >>> import optax, fedjax_sim as fs
      >>> algo = fedprox(fs.models.logistic_regression(60, 10), optax.sgd(0.01), mu=1.0)
    """
    mu = check_number("mu", mu, at_least=0)
    return fedopt(model, client_optimizer, server_optimizer, mu=mu, **kwargs)
