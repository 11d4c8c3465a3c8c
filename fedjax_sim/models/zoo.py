"""Built-in models: logistic regression, MLP, and the EMNIST CNN of Reddi et al. (2021)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from fedjax_sim.checks import check_integer, check_sizes
from fedjax_sim.models.adapters import from_linen
from fedjax_sim.models.core import Model, classifier
from fedjax_sim.models.layers import Conv


def logistic_regression(num_features: int, num_classes: int, *, x: str = "x",
                        y: str = "y") -> Model:
    """Multinomial logistic regression, zero-initialised (a convex baseline)."""
    num_features = check_integer("num_features", num_features, 1)

    def init(key):
        del key
        return {"w": jnp.zeros((num_features, num_classes), jnp.float32),
                "b": jnp.zeros((num_classes,), jnp.float32)}

    def apply(params, inputs, *, train, key):
        del train, key
        return inputs.reshape(inputs.shape[0], -1) @ params["w"] + params["b"]

    return classifier(init, apply, num_classes, x=x, y=y, input_shape=(num_features,))


class _MLP(nn.Module):
    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        h = inputs.reshape(inputs.shape[0], -1)
        for width in self.hidden:
            h = nn.relu(nn.Dense(width)(h))
        return nn.Dense(self.num_classes)(h)


def mlp(num_features: int, num_classes: int, hidden: Sequence[int] = (200,), *, x: str = "x",
        y: str = "y") -> Model:
    """A ReLU multilayer perceptron; `hidden=(200, 200)` is the EMNIST "dense 2x200" model."""
    num_features = check_integer("num_features", num_features, 1)
    hidden = check_sizes("hidden", hidden)
    return from_linen(_MLP(hidden, num_classes), (num_features,), num_classes, x=x, y=y)


class _EmnistCNN(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        h = inputs.reshape(inputs.shape[0], 28, 28, 1)
        h = nn.relu(Conv(32, (3, 3), padding="VALID")(h))
        h = nn.relu(Conv(64, (3, 3), padding="VALID")(h))
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = nn.Dropout(0.25, deterministic=not train)(h)
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(128)(h))
        h = nn.Dropout(0.5, deterministic=not train)(h)
        return nn.Dense(self.num_classes)(h)


def emnist_cnn(num_classes: int = 62, *, x: str = "x", y: str = "y") -> Model:
    """The EMNIST CNN of Reddi et al. (2021) and FedJAX: conv 32, conv 64, max-pool, dropout,
    dense 128, dropout, dense `num_classes` (1,206,590 parameters for 62 classes).

    Inputs are 28x28 images (any shape with 784 values per example).

    References: Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
    """
    return from_linen(_EmnistCNN(num_classes), (28, 28, 1), num_classes, x=x, y=y)


def num_params(params) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))
