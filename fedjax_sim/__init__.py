"""fedjax_sim: federated-learning simulation with a whole cohort as one compiled XLA program.

Example:
  >>> import optax, fedjax_sim as fs
  >>> train, test = fs.data.synthetic(1.0, 1.0, num_clients=100, seed=0)
  >>> model = fs.models.logistic_regression(num_features=60, num_classes=10)
  >>> algo = fs.algorithms.fedavg(model, optax.sgd(0.01), batch_size=10)
  >>> result = fs.simulate(algo, train, rounds=2, cohort_size=10, progress=False)
"""

from fedjax_sim import (
    aggregators,
    algorithms,
    asynchronous,
    attacks,
    auditing,
    client_store,
    compression,
    config,
    data,
    devices,
    dp_ftrl,
    experiment,
    filters,
    health,
    models,
    plots,
    privacy,
    robust,
    sampling,
    secagg,
    sinks,
    sweep,
)
from fedjax_sim.engine import ClientContext, ClientResult, ClientUpdate, Engine, client_mesh
from fedjax_sim.evaluation import Evaluation, evaluate, evaluate_pooled
from fedjax_sim.health import DivergedError
from fedjax_sim.simulation import Simulation, SimulationResult, simulate
from fedjax_sim.sweep import Sweep, simulate_sweep

__all__ = [
    "ClientContext",
    "ClientResult",
    "ClientUpdate",
    "DivergedError",
    "Engine",
    "Evaluation",
    "Simulation",
    "SimulationResult",
    "Sweep",
    "aggregators",
    "algorithms",
    "asynchronous",
    "attacks",
    "auditing",
    "client_mesh",
    "client_store",
    "compression",
    "config",
    "data",
    "devices",
    "dp_ftrl",
    "evaluate",
    "experiment",
    "evaluate_pooled",
    "filters",
    "health",
    "models",
    "plots",
    "privacy",
    "robust",
    "sampling",
    "secagg",
    "simulate",
    "sinks",
    "simulate_sweep",
    "sweep",
]
