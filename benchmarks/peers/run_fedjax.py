"""FedJAX 0.0.17 on one benchmark workload (run in benchmarks/peers/.venv-fedjax): prints one
RESULT line (see ../workloads.py).

  .venv-fedjax/bin/python run_fedjax.py --workload W1 --cohort 100

FedJAX's public API, as its examples use it: an `InMemoryFederatedData`, a
`UniformGetClientSampler`, `fed_avg.federated_averaging` (whose `apply` runs each client through
`for_each_client`: one jitted step per batch, in Python loops over batches and clients), FedJAX
optimizers. Models: the EMNIST CNN and the Shakespeare LSTM are FedJAX's own
(`fedjax.models.emnist.create_conv_model`, `fedjax.models.shakespeare.create_lstm_model`); the
784-200-10 MLP and the 784-10 logistic regression are haiku networks through
`fedjax.create_model_from_haiku` (FedJAX's dense model has two hidden layers).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# FedJAX 0.0.17 uses two aliases that later JAX releases removed (`jax.tree_map`, JAX 0.6;
# `jnp.NINF`, with NumPy 2). Restored where missing, so that FedJAX also runs on a machine's
# own newer JAX (a GPU machine with no network, where jax 0.4.20 for CUDA cannot be
# installed); with setup.sh's jax 0.4.20 nothing changes.
if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree.map
if not hasattr(jnp, "NINF"):
    jnp.NINF = -jnp.inf

import fedjax  # noqa: E402
import fedjax.version  # noqa: E402
import haiku as hk  # noqa: E402
import numpy as np  # noqa: E402
from fedjax.algorithms import fed_avg  # noqa: E402
from workloads import (  # noqa: E402
    MLP_HIDDEN,
    SEED,
    WORKLOADS,
    client_data,
    driver_parser,
    result_line,
    split_clients,
    time_rounds,
)


def dense_model(hidden: tuple[int, ...], num_classes: int) -> fedjax.Model:
    def forward_pass(batch):
        layers = [hk.Flatten()]
        for h in hidden:
            layers += [hk.Linear(h), jax.nn.relu]
        return hk.Sequential(layers + [hk.Linear(num_classes)])(batch["x"])

    return fedjax.create_model_from_haiku(
        transformed_forward_pass=hk.transform(forward_pass),
        sample_batch={"x": jnp.zeros((1, 784))},
        train_loss=lambda batch, preds: fedjax.metrics.unreduced_cross_entropy_loss(
            batch["y"], preds))


def build_model(w) -> fedjax.Model:
    if w.model == "mlp":
        return dense_model((MLP_HIDDEN,), w.num_classes)
    if w.model == "logistic":
        return dense_model((), w.num_classes)
    if w.model == "cnn":
        return fedjax.models.emnist.create_conv_model(only_digits=False)
    # vocab_size excludes PAD/BOS/EOS/OOV, which the model adds.
    return fedjax.models.shakespeare.create_lstm_model(vocab_size=w.num_classes - 4)


def main(argv=None) -> None:
    args = driver_parser(__doc__.split("\n")[0]).parse_args(argv)
    w = WORKLOADS[args.workload]
    x, y = client_data(w, args.cohort)
    data = fedjax.InMemoryFederatedData({
        f"{i:06d}".encode(): {"x": cx, "y": cy}
        for i, (cx, cy) in enumerate(split_clients(w, x, y))})
    model = build_model(w)
    algorithm = fed_avg.federated_averaging(
        fedjax.model_grad(model), fedjax.optimizers.sgd(w.client_lr),
        fedjax.optimizers.sgd(w.server_lr),
        fedjax.ShuffleRepeatBatchHParams(batch_size=w.batch_size, num_epochs=w.epochs,
                                         seed=SEED))
    sampler = fedjax.client_samplers.UniformGetClientSampler(data, args.cohort, seed=SEED)
    box = {"state": algorithm.init(model.init(jax.random.PRNGKey(SEED)))}

    def run_round():
        box["state"], _ = algorithm.apply(box["state"], sampler.sample())
        jax.block_until_ready(box["state"].params)

    timing = time_rounds(run_round, args.rounds, min_seconds=args.min_seconds)
    leaf = jax.tree_util.tree_leaves(box["state"].params)[0]
    assert np.all(np.isfinite(np.asarray(leaf))), "FedJAX diverged"
    result_line({"system": "fedjax", "workload": w.name, "cohort": args.cohort, **timing,
                 # FedJAX compiles lazily, in its first round (the suite's `derive`).
                 "compile_s": None,
                 "version": fedjax.version.__version__, "jax_version": jax.__version__})


if __name__ == "__main__":
    main()
