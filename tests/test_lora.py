"""LoRA adapters on the causal transformer (`causal_transformer(lora_rank=...)`): rank 0 is the
plain model, a fresh adapted model is its base, federated training with `trainable="lora"`
moves the adapters alone, and the upload's size by hand."""

import functools

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import filters
from fedjax_sim.testing import assert_trees_equal

D, HEADS, LAYERS, MLP, MAX_LEN, RANK = 16, 2, 2, 64, 16, 4


def _transformer(**kwargs):
    return fs.models.causal_transformer(d_model=D, num_heads=HEADS, num_layers=LAYERS,
                                        max_len=MAX_LEN, **kwargs)


def _random_params(model, seed=0):
    """Random params of the model's shapes, without compiling its initializers."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)


def _toy_text(num_clients=4, per_client=6, length=6):
    """tests/test_model_zoo.py's toy text: each sequence counts up from a client-specific
    start, with trailing padding of varied length."""
    x, y, ids = [], [], []
    for c in range(num_clients):
        for i in range(per_client):
            seq = 3 + (c + np.arange(length + 1)) % 12
            n = length - i % 3
            x.append(np.where(np.arange(length) < n, seq[:-1], fs.models.PAD))
            y.append(np.where(np.arange(length) < n, seq[1:], fs.models.PAD))
            ids.append(f"c{c}")
    return fs.data.from_arrays(ids, {"x": np.array(x, np.int32), "y": np.array(y, np.int32)})


@functools.cache
def _data():
    return _toy_text()


def _outputs(model, params):
    """Per-sequence loss and the metrics' sums on the whole toy population, as numpy."""
    batch = _data().features
    out = jax.jit(lambda p: (model.loss(p, batch, jax.random.key(0)), model.metrics(p, batch)))
    return jax.tree.map(np.asarray, out(params))


def _is_adapter(path):
    return "/lora/" in path


def _by_path(params):
    return {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_rank_zero_is_the_plain_model():
    plain, zero = _transformer(), _transformer(lora_rank=0)
    shapes = jax.eval_shape(plain.init, jax.random.key(0))
    assert jax.eval_shape(zero.init, jax.random.key(0)) == shapes
    params = _random_params(plain)
    assert_trees_equal(_outputs(zero, params), _outputs(plain, params), "rank-0 outputs")


def test_the_adapters_sit_beside_the_attention_and_mlp_kernels():
    shapes = jax.eval_shape(_transformer(lora_rank=RANK).init, jax.random.key(0))
    adapters = sorted(p for p in _by_path(shapes) if _is_adapter(p))
    layers = {p.rsplit("/lora/", 1)[0] for p in adapters}
    attention = {f"MultiHeadDotProductAttention_{i}/{name}" for i in range(LAYERS)
                 for name in ("query", "key", "value", "out")}
    assert layers == attention | {f"Dense_{i}" for i in range(2 * LAYERS)}  # not the logits'
    assert len(adapters) == 2 * len(layers)
    selected = _by_path(filters.mask("lora", shapes))
    assert {p for p, on in selected.items() if on} == set(adapters)
    base = {p: s for p, s in _by_path(shapes).items() if not _is_adapter(p)}
    assert base == _by_path(jax.eval_shape(_transformer().init, jax.random.key(0)))


def test_a_fresh_adapted_model_is_its_base():
    plain, lora = _transformer(), _transformer(lora_rank=RANK, lora_alpha=8.0)
    fresh = lora.init(jax.random.key(3))
    # Same key, same base: Linen derives each layer's key from its name.
    base_init = {p: v for p, v in _by_path(fresh).items() if not _is_adapter(p)}
    assert_trees_equal(base_init, _by_path(plain.init(jax.random.key(3))), "base at init")
    assert all(np.all(v == 0) for p, v in _by_path(fresh).items() if p.endswith("/lora/b"))
    assert all(np.std(v) > 0 for p, v in _by_path(fresh).items() if p.endswith("/lora/a"))
    trained_base = _random_params(plain, seed=1)  # stands for a pretrained base
    params = filters.with_base(fresh, trained_base)
    np.testing.assert_allclose(_outputs(lora, params)[0], _outputs(plain, trained_base)[0],
                               rtol=1e-6, atol=1e-6)
    # Nonzero B changes the outputs (the comparison above is not vacuous).
    moved = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.1 if "'b'" in jax.tree_util.keystr(path) else v, params)
    assert not np.allclose(_outputs(lora, moved)[0], _outputs(plain, trained_base)[0])


def test_fedavg_on_the_adapters_leaves_the_base_bitwise():
    lora = _transformer(lora_rank=RANK)
    params = filters.with_base(_random_params(lora), _random_params(_transformer(), seed=1))
    algo = fs.algorithms.fedavg(lora, optax.adam(0.03), batch_size=4, num_epochs=2,
                                trainable="lora")
    train = _data()
    result = fs.simulate(algo, train, rounds=3, cohort_size=train.num_clients, chunk_size=2,
                         params=params, progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert np.isfinite(losses[-1]) and losses[-1] < losses[0]
    before, after = _by_path(params), _by_path(result.params)
    for path in before:
        if _is_adapter(path):
            assert not np.allclose(after[path], before[path]), path
        else:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)


def test_the_upload_is_the_adapters_by_hand():
    lora = _transformer(lora_rank=RANK)
    trained = fs.algorithms.fedavg(lora, optax.sgd(0.1), trainable="lora").trained
    # A: [in, r], B: [r, out] per adapted layer; q, k, v and out are D -> D, the MLP D -> MLP
    # and MLP -> D.
    per_layer = 4 * RANK * (D + D) + 2 * RANK * (D + MLP)
    plain = fs.models.num_params(jax.eval_shape(_transformer().init, jax.random.key(0)))
    assert trained == filters.Trained(params=LAYERS * per_layer, bytes=4 * LAYERS * per_layer,
                                      total_params=plain + LAYERS * per_layer,
                                      total_bytes=4 * (plain + LAYERS * per_layer))
    assert LAYERS * per_layer == 2304


def test_bad_lora_arguments_are_refused():
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        _transformer(lora_rank=-1)
    with pytest.raises(TypeError, match="lora_rank must be an integer"):
        _transformer(lora_rank=2.0)
    with pytest.raises(ValueError, match="lora_alpha=8.0 is set but lora_rank is 0"):
        _transformer(lora_alpha=8.0)
    with pytest.raises(ValueError, match="lora_alpha"):
        _transformer(lora_rank=RANK, lora_alpha=0.0)
    with pytest.raises(ValueError, match=r"'lora' matches no parameter path.*Dense_0"):
        fs.algorithms.fedavg(_transformer(), optax.sgd(0.1), trainable="lora")


def test_with_base_refuses_a_base_of_another_shape():
    params = _random_params(_transformer(lora_rank=RANK))
    wider = _random_params(fs.models.causal_transformer(d_model=2 * D, num_heads=HEADS,
                                                        num_layers=LAYERS, max_len=MAX_LEN))
    with pytest.raises(ValueError, match=r"the base leaf 'Dense_0/bias' is float32\[128\], "
                                         r"the params' float32\[64\]"):
        filters.with_base(params, wider)
    deeper = _random_params(fs.models.causal_transformer(d_model=D, num_heads=HEADS,
                                                         num_layers=LAYERS + 1,
                                                         max_len=MAX_LEN))
    with pytest.raises(ValueError, match="have no place in the params"):
        filters.with_base(params, deeper)
