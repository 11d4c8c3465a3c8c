"""Federated algorithms: FedAvg, FedSGD and the FedOpt family."""

from fedjax_sim.algorithms.base import FederatedAlgorithm, RoundMetrics, ServerState
from fedjax_sim.algorithms.fedavg import fedavg, fedopt, fedsgd, optimizer_client_update
from fedjax_sim.algorithms.server_optimizers import (
    fedadagrad,
    fedadam,
    fedavgm,
    fedyogi,
    scale_by_fedopt,
)

__all__ = [
    "FederatedAlgorithm",
    "RoundMetrics",
    "ServerState",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedopt",
    "fedsgd",
    "fedyogi",
    "optimizer_client_update",
    "scale_by_fedopt",
]
