"""The baseline: FedAvg the way FedJAX executes it, a Python loop of small jitted calls.

One jitted per-step function `(params, opt_state, batch) -> (params, opt_state)`, called once
per local batch, in a Python loop over a client's batches (shuffled per client with numpy on
the host, each batch copied to the device as it is used), in a Python loop over the cohort's
clients. Each client's delta `server_params - client_params` is added, weighted by its example
count, into a running sum by a second jitted call; a third applies the server optimizer to the
weighted mean. This is the same math as `fs.algorithms.fedavg` (per-step loss averaged over the
batch, pseudo-gradient aggregated by example count, optax server optimizer), so from the same
initial params and data order the two give the same params up to float summation order.

Run alone for a quick timing: `python benchmarks/loop.py [cohort_size]`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


class LoopFedAvg:
    """FedAvg over clients held as host numpy arrays, one jitted call per local step.

    Args:
      model: a `fs.models` Model (its `loss(params, batch, key) -> f32[B]` is used).
      client_optimizer, server_optimizer: optax transformations.
      batch_size: examples per local step (a last partial batch is a separate shape and
        compiles once more, as in FedJAX).
      num_epochs: passes over each client's data.
    """

    def __init__(self, model, client_optimizer: optax.GradientTransformation,
                 server_optimizer: optax.GradientTransformation, *, batch_size: int,
                 num_epochs: int = 1):
        self.model, self.batch_size, self.num_epochs = model, batch_size, num_epochs
        self.client_optimizer, self.server_optimizer = client_optimizer, server_optimizer
        dropout_key = jax.random.key(0)  # the benchmark models have no dropout

        def step(params, opt_state, batch):
            def loss_fn(p):
                return jnp.mean(model.loss(p, batch, dropout_key))

            grads = jax.grad(loss_fn)(params)
            updates, opt_state = client_optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        def accumulate(acc, server_params, client_params, weight):
            return jax.tree.map(lambda a, s, c: a + weight * (s - c), acc, server_params,
                                client_params)

        def server_update(params, opt_state, acc, total_weight):
            mean_delta = jax.tree.map(lambda a: a / total_weight, acc)
            updates, opt_state = server_optimizer.update(mean_delta, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        self.step = jax.jit(step)
        self.accumulate = jax.jit(accumulate)
        self.server_update = jax.jit(server_update)

    def init(self, params) -> tuple[Any, Any]:
        params = jax.tree.map(jnp.asarray, params)
        return params, self.server_optimizer.init(params)

    def compile(self, params, example_batch: dict[str, np.ndarray]) -> float:
        """Traces, lowers and compiles the three jitted functions ahead of time; returns seconds.

        (The jitted functions then compile again on first call unless JAX's in-memory cache
        serves them; the benchmark's warm-up round absorbs that either way.)
        """
        t = time.perf_counter()
        client_state = self.client_optimizer.init(params)
        server_state = self.server_optimizer.init(params)
        w = np.float32(1.0)
        self.step.lower(params, client_state, example_batch).compile()
        self.accumulate.lower(params, params, params, w).compile()
        self.server_update.lower(params, server_state, params, w).compile()
        return time.perf_counter() - t

    def round(self, params, server_opt_state, clients: Sequence[dict[str, np.ndarray]],
              rng: np.random.Generator | None):
        """One round over `clients` (each a dict of host arrays); `rng=None` keeps data order.

        Returns the new `(params, server_opt_state)`; results may still be in flight (call
        `jax.block_until_ready` to time it).
        """
        b = self.batch_size
        acc = jax.tree.map(jnp.zeros_like, params)
        total = 0
        for data in clients:
            n = len(next(iter(data.values())))
            order = np.concatenate([rng.permutation(n) if rng is not None else np.arange(n)
                                    for _ in range(self.num_epochs)])
            client_params, opt_state = params, self.client_optimizer.init(params)
            for s in range(0, len(order), b):
                idx = order[s:s + b]
                batch = {k: v[idx] for k, v in data.items()}
                client_params, opt_state = self.step(client_params, opt_state, batch)
            acc = self.accumulate(acc, params, client_params, np.float32(n))
            total += n
        return self.server_update(params, server_opt_state, acc, np.float32(total))


def client_arrays(data) -> list[dict[str, np.ndarray]]:
    """A `fs.data.FederatedData` as a list of per-client dicts of host arrays (views)."""
    return [data.client(i) for i in range(data.num_clients)]


if __name__ == "__main__":
    import sys

    import fedjax_sim as fs

    cohort = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    rng = np.random.default_rng(0)
    x = rng.standard_normal((cohort * 64, 784), dtype=np.float32)
    y = rng.integers(0, 10, cohort * 64).astype(np.int32)
    train = fs.data.from_arrays(np.repeat(np.arange(cohort), 64), {"x": x, "y": y})
    model = fs.models.mlp(784, 10, hidden=(200,))
    loop = LoopFedAvg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=16)
    params, opt_state = loop.init(model.init(jax.random.key(0)))
    clients = client_arrays(train)
    print(f"compile {loop.compile(params, {k: v[:16] for k, v in clients[0].items()}):.3f}s")
    for r in range(4):
        t = time.perf_counter()
        params, opt_state = jax.block_until_ready(loop.round(params, opt_state, clients, rng))
        print(f"round {r}: {time.perf_counter() - t:.3f}s")
