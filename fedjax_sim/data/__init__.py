"""Federated data: populations, cohort packing and built-in data sets."""

from fedjax_sim.data.cohort import Batching, Cohort, CohortShape, pack_cohort
from fedjax_sim.data.federated import FederatedData, from_arrays, from_client_dict
from fedjax_sim.data.synthetic import synthetic

__all__ = [
    "Batching",
    "Cohort",
    "CohortShape",
    "FederatedData",
    "from_arrays",
    "from_client_dict",
    "pack_cohort",
    "synthetic",
]
