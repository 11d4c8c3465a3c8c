"""Federated algorithms: FedAvg, FedSGD, the FedOpt family, FedProx, SCAFFOLD, Mime, MimeLite,
FedNova, FedDyn, q-FFL and agnostic FedAvg; personalization: Ditto, APFL, pFedMe, FedRep,
FedPer and, clustered, HypCluster and IFCA; `ExampleDP`: DP-SGD in the FedOpt family's local
steps; asynchronous FedBuff (`fedbuff`, run by `fs.asynchronous`)."""

from fedjax_sim.algorithms.agnostic import agnostic_fedavg
from fedjax_sim.algorithms.apfl import apfl
from fedjax_sim.algorithms.base import (
    FederatedAlgorithm,
    RoundInputs,
    RoundMetrics,
    ServerState,
    with_hparams,
)
from fedjax_sim.algorithms.clustered import hypcluster, ifca, stacked_model
from fedjax_sim.algorithms.ditto import ditto
from fedjax_sim.algorithms.dp_sgd import ExampleDP
from fedjax_sim.algorithms.fedavg import fedavg, fedopt, fedsgd, optimizer_client_update
from fedjax_sim.algorithms.fedbuff import BufferedAlgorithm, fedbuff
from fedjax_sim.algorithms.feddyn import feddyn
from fedjax_sim.algorithms.fednova import fednova
from fedjax_sim.algorithms.fedprox import fedprox
from fedjax_sim.algorithms.fedrep import fedper, fedrep
from fedjax_sim.algorithms.mime import mime, mimelite
from fedjax_sim.algorithms.pfedme import pfedme
from fedjax_sim.algorithms.qffl import qffl
from fedjax_sim.algorithms.scaffold import scaffold
from fedjax_sim.algorithms.server_optimizers import (
    fedadagrad,
    fedadam,
    fedavgm,
    fedyogi,
    scale_by_fedopt,
)

__all__ = [
    "BufferedAlgorithm",
    "ExampleDP",
    "agnostic_fedavg",
    "apfl",
    "FederatedAlgorithm",
    "RoundInputs",
    "RoundMetrics",
    "ServerState",
    "ditto",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedbuff",
    "feddyn",
    "fednova",
    "fedper",
    "fedrep",
    "fedopt",
    "fedprox",
    "fedsgd",
    "fedyogi",
    "hypcluster",
    "ifca",
    "mime",
    "mimelite",
    "pfedme",
    "qffl",
    "optimizer_client_update",
    "scaffold",
    "scale_by_fedopt",
    "stacked_model",
    "with_hparams",
]
