"""Models: the `Model` interface, adapters from Flax and functions, and built-in models."""

from fedjax_sim.models.adapters import from_function, from_linen, from_nnx
from fedjax_sim.models.core import Model, classifier
from fedjax_sim.models.zoo import emnist_cnn, logistic_regression, mlp, num_params

__all__ = [
    "Model",
    "classifier",
    "emnist_cnn",
    "from_function",
    "from_linen",
    "from_nnx",
    "logistic_regression",
    "mlp",
    "num_params",
]
