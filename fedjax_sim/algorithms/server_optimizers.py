"""Server optimizers of the FedOpt family, with the update rules of Reddi et al. (2021).

The server receives the pseudo-gradient g = server_params - mean(client_params) = -Delta_t.
Algorithm 2 of the paper, written in g (the signs of m flip, v is unchanged):

  m_t = b1 m_{t-1} + (1 - b1) g
  v_t = v_{t-1} + g^2                                              (FedAdagrad)
  v_t = b2 v_{t-1} + (1 - b2) g^2                                  (FedAdam)
  v_t = v_{t-1} - (1 - b2) g^2 sign(v_{t-1} - g^2)                 (FedYogi)
  x_{t+1} = x_t - lr m_t / (sqrt(v_t) + tau),     v_{-1} = tau^2

with no bias correction (optax's `adam` and `yogi` correct bias; they can be passed as
`server_optimizer` too, they are just not the paper's rule).

References: Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ScaleByFedOptState(NamedTuple):
    m: optax.Updates
    v: optax.Updates


def scale_by_fedopt(
    kind: Literal["adagrad", "adam", "yogi"], b1: float = 0.9, b2: float = 0.99,
    tau: float = 1e-3,
) -> optax.GradientTransformation:
    """Scales the pseudo-gradient by Reddi et al.'s adaptive rule (before the learning rate)."""
    if kind not in ("adagrad", "adam", "yogi"):
        raise ValueError(f"kind must be 'adagrad', 'adam' or 'yogi', got {kind!r}")
    _check_decay("b1", b1)
    _check_decay("b2", b2)
    if not tau > 0:  # v starts at tau^2 and tau guards the division: 0 / 0 where g is 0
        raise ValueError(f"tau must be > 0 (the adaptivity floor, 1e-3 in the paper), got {tau}")

    def init(params):
        return ScaleByFedOptState(
            m=jax.tree.map(jnp.zeros_like, params),
            v=jax.tree.map(lambda p: jnp.full_like(p, tau**2), params),
        )

    def second_moment(v, g):
        g2 = g * g
        if kind == "adagrad":
            return v + g2
        if kind == "adam":
            return b2 * v + (1 - b2) * g2
        return v - (1 - b2) * g2 * jnp.sign(v - g2)

    def update(updates, state, params=None):
        del params
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, updates)
        v = jax.tree.map(second_moment, state.v, updates)
        scaled = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
        return scaled, ScaleByFedOptState(m, v)

    return optax.GradientTransformation(init, update)


def _check_decay(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1) (a moving average's decay), got {value}")


def _fedopt_optimizer(kind, learning_rate, b1, b2, tau):
    return optax.chain(scale_by_fedopt(kind, b1, b2, tau),
                       optax.scale_by_learning_rate(learning_rate))


def fedadam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.99,
            tau: float = 1e-3) -> optax.GradientTransformation:
    """FedAdam's server optimizer (Reddi et al. 2021, Algorithm 2)."""
    return _fedopt_optimizer("adam", learning_rate, b1, b2, tau)


def fedyogi(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.99,
            tau: float = 1e-3) -> optax.GradientTransformation:
    """FedYogi's server optimizer (Reddi et al. 2021, Algorithm 2)."""
    return _fedopt_optimizer("yogi", learning_rate, b1, b2, tau)


def fedadagrad(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
               tau: float = 1e-3) -> optax.GradientTransformation:
    """FedAdagrad's server optimizer (Reddi et al. 2021, Algorithm 2)."""
    return _fedopt_optimizer("adagrad", learning_rate, b1, 0.0, tau)


def fedavgm(learning_rate: optax.ScalarOrSchedule,
            momentum: float = 0.9) -> optax.GradientTransformation:
    """FedAvgM's server optimizer: SGD with heavy-ball momentum (Hsu et al. 2019)."""
    _check_decay("momentum", momentum)
    return optax.sgd(learning_rate, momentum=momentum)
