"""Federated data: populations, cohort packing and built-in data sets."""

from fedjax_sim.data import download, partition, storage
from fedjax_sim.data.cohort import Batching, Cohort, CohortShape, pack_cohort
from fedjax_sim.data.federated import FederatedData, from_arrays, from_client_dict
from fedjax_sim.data.fedjax_sqlite import load_fedjax_sqlite, write_fedjax_sqlite
from fedjax_sim.data.femnist import femnist
from fedjax_sim.data.leaf import load_leaf
from fedjax_sim.data.shakespeare import shakespeare
from fedjax_sim.data.synthetic import synthetic
from fedjax_sim.data.tff_datasets import (
    cifar100_tff,
    emnist_fedjax,
    emnist_tff,
    shakespeare_tff,
    stackoverflow_tff,
)
from fedjax_sim.data.tff_sqlite import load_tff_sqlite

__all__ = [
    "Batching",
    "cifar100_tff",
    "Cohort",
    "CohortShape",
    "download",
    "emnist_fedjax",
    "emnist_tff",
    "FederatedData",
    "femnist",
    "from_arrays",
    "from_client_dict",
    "load_fedjax_sqlite",
    "load_leaf",
    "load_tff_sqlite",
    "pack_cohort",
    "partition",
    "shakespeare",
    "shakespeare_tff",
    "stackoverflow_tff",
    "storage",
    "synthetic",
    "write_fedjax_sqlite",
]
