"""Built-in models and the Linen / NNX / function adapters against logits computed by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from fedjax_sim import models
from fedjax_sim.models import Model, classifier, num_params

B = 5


def batch(num_features=6, num_classes=4, n=B, seed=0, key_x="x", key_y="y"):
    rng = np.random.default_rng(seed)
    return {key_x: jnp.asarray(rng.normal(size=(n, num_features)).astype(np.float32)),
            key_y: jnp.asarray(rng.integers(0, num_classes, n).astype(np.int32))}


def expected_ce(logits, labels):
    """Softmax cross-entropy by hand, in float64."""
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
    return logz - logits[np.arange(len(labels)), np.asarray(labels)]


def check_classifier(model: Model, params, data, logits, *, x="x", y="y"):
    # Jitted: one compile is much cheaper than Flax's many eager ops on a busy CPU.
    loss, m = jax.jit(lambda p, d: (model.loss(p, d, jax.random.key(0)),
                                    model.metrics(p, d)))(params, data)
    assert loss.shape == (len(data[y]),)
    np.testing.assert_allclose(loss, expected_ce(logits, data[y]), rtol=1e-5, atol=1e-5)
    assert set(m) == {"loss", "accuracy"}
    np.testing.assert_allclose(m["loss"], expected_ce(logits, data[y]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        m["accuracy"], (np.argmax(np.asarray(logits), -1) == np.asarray(data[y])).astype(float))


# -- built-in models -------------------------------------------------------------------------
def test_logistic_regression():
    model = models.logistic_regression(6, 4)
    params = model.init(jax.random.key(0))
    assert params["w"].shape == (6, 4) and params["b"].shape == (4,)
    assert num_params(params) == 6 * 4 + 4
    assert np.all(np.asarray(params["w"]) == 0)  # zero-initialised
    assert model.label == ("y", 4)
    data = batch()
    # Zero params: uniform prediction, loss log(4) for every example.
    np.testing.assert_allclose(model.loss(params, data, jax.random.key(0)), np.log(4) * np.ones(B),
                               rtol=1e-6)
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=4), jnp.float32)}
    logits = np.asarray(data["x"]) @ np.asarray(params["w"]) + np.asarray(params["b"])
    check_classifier(model, params, data, logits)
    # Any input shape with num_features values per example.
    images = {"x": data["x"].reshape(B, 2, 3), "y": data["y"]}
    np.testing.assert_allclose(model.loss(params, images, None),
                               model.loss(params, data, None), rtol=1e-6)


def test_logistic_regression_custom_keys():
    model = models.logistic_regression(6, 4, x="pixels", y="label")
    assert model.label == ("label", 4)
    data = batch(key_x="pixels", key_y="label")
    params = model.init(jax.random.key(0))
    assert model.metrics(params, data)["loss"].shape == (B,)


@pytest.mark.parametrize("num_features, num_classes, hidden", [
    (60, 10, (200,)),
    (784, 62, (200, 200)),
    (6, 4, (8, 5)),
])
def test_mlp_param_count_and_shapes(num_features, num_classes, hidden):
    model = models.mlp(num_features, num_classes, hidden)
    params = jax.eval_shape(model.init, jax.random.key(0))  # shapes only: nothing to compile
    widths = (num_features, *hidden, num_classes)
    expected = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
    assert num_params(params) == expected
    assert [params[f"Dense_{i}"]["kernel"].shape for i in range(len(widths) - 1)] == \
        list(zip(widths[:-1], widths[1:], strict=True))
    data = batch(num_features, num_classes, n=3)
    assert jax.eval_shape(model.loss, params, data, jax.random.key(0)).shape == (3,)
    m = jax.eval_shape(model.metrics, params, data)
    assert m["loss"].shape == (3,) and m["accuracy"].shape == (3,)


def test_mlp_matches_hand_computed_logits():
    model = models.mlp(6, 4, hidden=(8,))
    params = jax.jit(model.init)(jax.random.key(3))
    data = batch()
    d0, d1 = params["Dense_0"], params["Dense_1"]
    h = np.maximum(np.asarray(data["x"]) @ np.asarray(d0["kernel"]) + np.asarray(d0["bias"]), 0)
    logits = h @ np.asarray(d1["kernel"]) + np.asarray(d1["bias"])
    check_classifier(model, params, data, logits)


def test_emnist_cnn():
    model = models.emnist_cnn(62)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    assert num_params(shapes) == 1_206_590
    assert num_params(jax.eval_shape(models.emnist_cnn(10).init, jax.random.key(0))) == \
        1_206_590 - 52 * 129
    assert model.label == ("y", 62)
    params = jax.jit(model.init)(jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(3, 28, 28)).astype(np.float32)
    data = {"x": jnp.asarray(images), "y": jnp.array([0, 61, 30], jnp.int32)}
    flat = {"x": jnp.asarray(images.reshape(3, 784)), "y": data["y"]}
    k1, k2 = jax.random.key(1), jax.random.key(2)

    @jax.jit
    def run(params, key):
        return (model.metrics(params, data), model.metrics(params, flat),
                model.loss(params, data, key))

    metrics, metrics_flat, l1 = run(params, k1)
    metrics_again, _, l1_again = run(params, k1)
    _, _, l2 = run(params, k2)
    assert metrics["loss"].shape == (3,) and metrics["accuracy"].shape == (3,)
    assert set(np.asarray(metrics["accuracy"]).tolist()) <= {0.0, 1.0}
    # Any input shape with 784 values per example.
    np.testing.assert_allclose(metrics_flat["loss"], metrics["loss"], rtol=1e-5)
    # Dropout: training losses depend on the key; evaluation is deterministic.
    assert l1.shape == (3,)
    np.testing.assert_array_equal(l1, l1_again)
    assert not np.allclose(l1, l2)
    assert not np.allclose(l1, metrics["loss"])
    np.testing.assert_array_equal(metrics["loss"], metrics_again["loss"])


# -- adapters --------------------------------------------------------------------------------
class DropoutMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Dense(16)(x))
        h = nn.Dropout(0.5, deterministic=not train)(h)
        return nn.Dense(4)(h)


class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(jnp.tanh(nn.Dense(7)(x)))


def test_from_linen_without_train_arg():
    module = Plain()
    model = models.from_linen(module, (6,), 4, train_arg=None)
    params = jax.jit(model.init)(jax.random.key(0))
    # The same init as Linen's own, with the params collection only.
    want = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 6)))["params"]
    jax.tree.map(np.testing.assert_array_equal, params, want)
    data = batch()
    logits = jax.jit(module.apply)({"params": params}, data["x"])
    check_classifier(model, params, data, logits)


def test_from_linen_dropout_uses_key():
    module = DropoutMLP()
    model = models.from_linen(module, (6,), 4)
    params = jax.jit(model.init)(jax.random.key(0))
    data = batch(n=16)
    k1, k2 = jax.random.key(1), jax.random.key(2)

    @jax.jit
    def run(params):
        return (module.apply({"params": params}, data["x"], train=False),
                module.apply({"params": params}, data["x"], train=True, rngs={"dropout": k1}),
                model.metrics(params, data), model.metrics(params, data),
                model.loss(params, data, k1), model.loss(params, data, k1),
                model.loss(params, data, k2))

    logits, train_logits, m1, m2, l1, l1b, l2 = run(params)
    # Evaluation: dropout off, the logits of apply(train=False), deterministic.
    np.testing.assert_allclose(m1["loss"], expected_ce(logits, data["y"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(m1["loss"], m2["loss"])
    # Training: dropout drawn from the key.
    np.testing.assert_array_equal(l1, l1b)
    assert not np.allclose(l1, l2)
    assert not np.allclose(l1, m1["loss"])
    # And exactly Linen's dropout with that key.
    np.testing.assert_allclose(l1, expected_ce(train_logits, data["y"]), rtol=1e-5, atol=1e-5)
    # Gradients flow through the dropout path under jit.
    g = jax.jit(jax.grad(lambda p: jnp.mean(model.loss(p, data, k1))))(params)
    assert jax.tree.structure(g) == jax.tree.structure(params)
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g))


def test_from_nnx_linear():
    module = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    model = models.from_nnx(module, 4)
    params = model.init(jax.random.key(0))
    assert num_params(params) == 6 * 4 + 4
    data = batch()
    logits = np.asarray(data["x"]) @ np.asarray(module.kernel[...]) + np.asarray(
        module.bias[...])
    check_classifier(model, params, data, logits)
    # Params are a pytree the engine can differentiate and update.
    @jax.jit
    def sgd_step(params):
        g = jax.grad(lambda p: jnp.mean(model.loss(p, data, None)))(params)
        new = jax.tree.map(lambda p, d: p - 0.1 * d, params, g)
        return jnp.mean(model.metrics(params, data)["loss"]), jnp.mean(
            model.metrics(new, data)["loss"])

    before, after = sgd_step(params)
    assert after < before


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(6, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def test_from_nnx_mlp():
    module = NnxMLP(nnx.Rngs(3))
    model = models.from_nnx(module, 4, x="inputs", y="labels")
    assert model.label == ("labels", 4)
    params = model.init(None)
    assert num_params(params) == 6 * 8 + 8 + 8 * 4 + 4
    data = batch(key_x="inputs", key_y="labels")
    x = np.asarray(data["inputs"])
    h = np.maximum(x @ np.asarray(module.l1.kernel[...]) + np.asarray(module.l1.bias[...]), 0)
    logits = h @ np.asarray(module.l2.kernel[...]) + np.asarray(module.l2.bias[...])
    check_classifier(model, params, data, logits, x="inputs", y="labels")
    # Also under jit and vmap over params (as the engine runs clients side by side).
    stacked = jax.tree.map(lambda p: jnp.stack([p, 2 * p]), params)
    losses = jax.jit(jax.vmap(lambda p: model.metrics(p, data)["loss"]))(stacked)
    np.testing.assert_allclose(losses[0], expected_ce(logits, data["labels"]), rtol=1e-5,
                               atol=1e-5)
    assert not np.allclose(losses[0], losses[1])


def test_from_function():
    def init(key):
        return {"w": jax.random.normal(key, (6, 4)), "s": jnp.float32(2.0)}

    def apply(params, x):
        return params["s"] * jnp.sin(x @ params["w"])

    model = models.from_function(init, apply, 4)
    params = model.init(jax.random.key(5))
    data = batch()
    logits = 2.0 * np.sin(np.asarray(data["x"], np.float64) @ np.asarray(params["w"]))
    check_classifier(model, params, data, logits)
    assert model.label == ("y", 4)


def test_classifier_accuracy_is_per_example_zero_one():
    # Logits are the inputs themselves.
    model = classifier(lambda key: {}, lambda p, x, *, train, key: x, 3)
    x = jnp.array([[5.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 2.0], [2.0, 9.0, 0.0]])
    y = jnp.array([0, 2, 2, 0], jnp.int32)
    m = model.metrics({}, {"x": x, "y": y})
    np.testing.assert_array_equal(m["accuracy"], [1.0, 0.0, 1.0, 0.0])
    assert m["accuracy"].dtype == jnp.float32
    np.testing.assert_allclose(m["loss"], optax.softmax_cross_entropy_with_integer_labels(x, y))
    np.testing.assert_allclose(m["loss"], expected_ce(x, y), rtol=1e-5)
    # train=True is passed to the loss, False to the metrics.
    seen = []

    def apply(p, x, *, train, key):
        seen.append((train, key is None))
        return x

    model = classifier(lambda key: {}, apply, 3)
    model.loss({}, {"x": x, "y": y}, jax.random.key(0))
    model.metrics({}, {"x": x, "y": y})
    assert seen == [(True, False), (False, True)]
