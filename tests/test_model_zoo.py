"""The model zoo: parameter counts against the published architectures, masked sequence losses
and metrics, transformer causality, group-norm independence, and training under the engine."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.models import resnet
from fedjax_sim.models.sequence import CHAR_EOS, PAD, next_token_model, word_tokens

T = 8  # the length of every tiny sequence batch


def _count(model):
    return fs.models.num_params(jax.eval_shape(model.init, jax.random.key(0)))


def _lstm(inp, h):
    # Four gates, each with an input kernel, a recurrent kernel and a bias.
    return 4 * (inp + h + 1) * h


def _dense(inp, out):
    return (inp + 1) * out


def test_char_lstm_parameter_count_matches_leaf_fedjax():
    v, e, h = 90, 8, 256
    expected = v * e + _lstm(e, h) + _lstm(h, h) + _dense(h, v)
    assert expected == 820_522
    assert _count(fs.models.char_lstm()) == expected


def test_word_lstm_parameter_count_matches_reddi_et_al():
    v = 10_000 + 1 + 3  # words, one OOV bucket, PAD/BOS/EOS
    expected = v * 96 + _lstm(96, 670) + _dense(670, 96) + _dense(96, v)
    assert expected == 4_050_748  # Reddi et al. 2021, Table 6 (Stack Overflow NWP)
    assert _count(fs.models.word_lstm()) == expected


def test_causal_transformer_parameter_count():
    v, t, d, m, layers = 90, 128, 128, 512, 2
    block = 2 * 2 * d + 4 * _dense(d, d) + _dense(d, m) + _dense(m, d)  # 2 LNs, q/k/v/out, MLP
    expected = v * d + t * d + layers * block + 2 * d + _dense(d, v)
    assert _count(fs.models.causal_transformer(v, max_len=t, d_model=d)) == expected


def test_resnet18_gn_parameter_count():
    def conv(k, cin, cout):
        return k * k * cin * cout + 2 * cout  # no bias; the GroupNorm's scale and bias

    expected, cin = conv(3, 3, 64), 64
    for c in (64, 128, 256, 512):
        expected += conv(3, cin, c) + conv(3, c, c) + conv(3, c, c) + conv(3, c, c)
        expected += conv(1, cin, c) if cin != c else 0
        cin = c
    expected += _dense(512, 100)
    assert expected == 11_220_132
    assert _count(fs.models.resnet18_gn()) == expected


def test_word_token_layout_follows_tff():
    t = word_tokens(10_000)
    assert (t.pad, t.oov, t.bos, t.eos, t.size) == (0, (10_001,), 10_002, 10_003, 10_004)
    t = word_tokens(5, num_oov_buckets=3)
    assert (t.oov, t.bos, t.eos, t.size) == ((6, 7, 8), 9, 10, 11)
    with pytest.raises(ValueError, match="num_oov_buckets"):
        word_tokens(5, num_oov_buckets=0)


def _fixed_logits_model(accuracies):
    """A next-token model whose params are the logits themselves."""
    return next_token_model(lambda key: None, lambda p, tokens, *, train, key: p, 6,
                            accuracies=accuracies)


def _ratios(metrics):
    return {k: tuple(np.asarray(x).tolist() for x in v) for k, v in metrics.items()}


def test_next_token_loss_and_metrics_by_hand():
    # Targets: two real tokens, EOS (id 2), one excluded id (5), then PAD.
    y = np.array([[3, 4, 2, 5, PAD]], np.int32)
    pred = np.array([[3, 1, 2, 5, 4]])  # right, wrong, right, right, (padding)
    logits = np.where(np.arange(6) == pred[..., None], 2.0, 0.0).astype(np.float32)
    model = _fixed_logits_model({"accuracy": (), "no_eos": (2,), "no_eos_or_5": (2, 5)})
    batch = {"x": np.zeros_like(y), "y": y}
    ce = np.log(np.exp(2.0) + 5) - np.array([2.0, 0.0, 2.0, 2.0])
    m = _ratios(model.metrics(logits, batch))
    np.testing.assert_allclose(m["loss"][0], [ce.sum()], rtol=1e-6)
    assert m["loss"][1] == [4.0]
    assert m["accuracy"] == ([3.0], [4.0])
    assert m["no_eos"] == ([2.0], [3.0])
    assert m["no_eos_or_5"] == ([1.0], [2.0])
    np.testing.assert_allclose(model.loss(logits, batch, None), [ce.mean()], rtol=1e-6)


def test_pad_targets_do_not_change_loss_or_metrics_even_with_inf_logits():
    y = np.array([[3, 4, PAD, PAD], [PAD, PAD, PAD, PAD]], np.int32)
    logits = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 6)))
    bad = logits.copy()
    bad[y == PAD] = np.inf  # softmax of inf logits is nan: must not leak
    model = _fixed_logits_model({"accuracy": ()})
    batch = {"x": np.zeros_like(y), "y": y}
    assert _ratios(model.metrics(bad, batch)) == _ratios(model.metrics(logits, batch))
    clean, dirty = model.loss(logits, batch, None), model.loss(bad, batch, None)
    np.testing.assert_array_equal(clean, dirty)
    assert dirty[1] == 0.0  # a sequence with no target has loss 0, not nan


def _random_params(model):
    """Random params of the right shapes without compiling the initializers (seconds each on
    CPU); the tests below need no particular initialization."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return model, jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)


TINY = {
    "char_lstm": lambda: fs.models.char_lstm(hidden=16),
    "causal_transformer": lambda: fs.models.causal_transformer(d_model=16, num_heads=2,
                                                               max_len=T),
    "word_lstm": lambda: fs.models.word_lstm(vocab_size=20, embed_dim=8, hidden=16,
                                             projection=8),
}


@functools.cache
def _tiny(name):
    """A tiny model, its params, and `(params, batch) -> (loss, metrics)` compiled once: every
    batch below has the same [2, T] shape, so each model compiles one program."""
    model, params = _random_params(TINY[name]())
    fn = jax.jit(lambda p, b: (model.loss(p, b, jax.random.key(0)), model.metrics(p, b)))
    return model, params, fn


def _batch(*rows):
    """Rows of (inputs, targets), padded with PAD to a [2, T] batch."""
    out = {"x": np.full((2, T), PAD, np.int32), "y": np.full((2, T), PAD, np.int32)}
    for i, (x, y) in enumerate(rows):
        out["x"][i, :len(x)], out["y"][i, :len(y)] = x, y
    return out


def _run(name, batch, params=None):
    _, init, fn = _tiny(name)
    loss, metrics = fn(init if params is None else params, batch)
    return np.asarray(loss), _ratios(metrics)


@pytest.mark.parametrize("name", sorted(TINY))
def test_padded_positions_do_not_change_a_sequence_model(name):
    a = _batch(([1, 5, 6, 7], [5, 6, 7, 2]), ([1, 8, 9], [8, 9, 2]))
    # Other inputs wherever the target is PAD.
    b = {"x": np.where(a["y"] == PAD, 11, a["x"]), "y": a["y"]}
    loss_a, ma = _run(name, a)
    loss_b, mb = _run(name, b)
    assert ma.keys() == mb.keys() and "loss" in ma and "accuracy" in ma
    for k in ma:
        np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    assert ma["loss"][1] == [4.0, 3.0]
    # A real input does matter (the comparison above is not vacuous).
    changed = {"x": np.where(np.arange(T) == 1, 12, a["x"]), "y": a["y"]}
    assert not np.allclose(_run(name, changed)[0], loss_a)


def test_transformer_is_causal():
    x, y = np.array([1, 5, 6, 7, 8, 9, 10, 11]), np.array([5, 6, 7, 8, 9, 10, 11, 2])
    for k in range(1, T):
        # Only the prediction at position k - 1 is scored; change every token from k on.
        scored = np.where(np.arange(T) == k - 1, y, PAD)
        base = _run("causal_transformer", _batch((x, scored)))[0][0]
        future = _run("causal_transformer", _batch((np.where(np.arange(T) >= k, 14, x), scored)))
        past = _run("causal_transformer", _batch((np.where(np.arange(T) == k - 1, 14, x), scored)))
        np.testing.assert_allclose(future[0][0], base, rtol=1e-5)
        assert not np.isclose(past[0][0], base)
    model, params, _ = _tiny("causal_transformer")
    with pytest.raises(ValueError, match="max_len"):
        jax.eval_shape(model.metrics, params, {"x": np.zeros((1, T + 1), np.int32),
                                               "y": np.zeros((1, T + 1), np.int32)})


def _boost(name, layer, token):
    """Params whose every prediction is `token`: a large bias on that logit."""
    params = jax.tree.map(np.copy, _tiny(name)[1])
    params[layer]["bias"][token] = 100.0
    return params


def test_word_lstm_accuracy_excludes_oov_and_eos_but_loss_counts_them():
    tokens = word_tokens(20)
    oov, eos, word = tokens.oov[0], tokens.eos, 7
    x = [tokens.bos, 3, 4, 5]
    batch = _batch((x, [word, oov, eos, oov]), (x, [word, word, word, word]))
    # Predicting OOV everywhere: right on the two OOV targets, which accuracy ignores.
    _, m = _run("word_lstm", batch, _boost("word_lstm", "Dense_1", oov))
    assert m["accuracy"] == ([0.0, 0.0], [1.0, 4.0])
    assert m["loss"][1] == [4.0, 4.0]
    _, m = _run("word_lstm", batch, _boost("word_lstm", "Dense_1", word))
    assert m["accuracy"] == ([1.0, 4.0], [1.0, 4.0])
    # OOV and EOS targets still weigh in the loss: wrong predictions on them cost a lot.
    assert m["loss"][0][0] > 100 * m["loss"][0][1]


def test_char_models_report_accuracy_with_and_without_eos():
    for name, layer in (("char_lstm", "Dense_0"), ("causal_transformer", "Dense_4")):
        batch = _batch(([1, 5, 6], [5, CHAR_EOS]))
        _, m = _run(name, batch, _boost(name, layer, CHAR_EOS))
        assert m["accuracy"] == ([1.0, 0.0], [2.0, 0.0])
        assert m["accuracy_no_eos"] == ([0.0, 0.0], [1.0, 0.0])


def _toy_text(num_clients=4, per_client=6, length=6):
    """Every sequence counts up from a client-specific start: learnable, and the same each time.
    Trailing padding of varied length exercises the masks inside the engine."""
    x, y, ids = [], [], []
    for c in range(num_clients):
        for i in range(per_client):
            seq = 3 + (c + np.arange(length + 1)) % 12
            n = length - i % 3  # real positions
            x.append(np.where(np.arange(length) < n, seq[:-1], PAD))
            y.append(np.where(np.arange(length) < n, seq[1:], PAD))
            ids.append(f"c{c}")
    return fs.data.from_arrays(ids, {"x": np.array(x, np.int32), "y": np.array(y, np.int32)})


def _toy_images(num_clients=4, per_client=4):
    rng = np.random.default_rng(0)
    n = num_clients * per_client
    return fs.data.from_arrays(np.repeat([f"c{c}" for c in range(num_clients)], per_client),
                               {"x": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
                                "y": rng.integers(0, 10, n).astype(np.int32)})


ENGINE_CASES = {
    # The LSTMs' and the transformer's compiles under the engine take 7-16 s each: one runs
    # by default, the others in CI's slow tests.
    **{name: pytest.param((lambda name=name: _tiny(name)[:2], _toy_text),
                          marks=() if name == "char_lstm" else pytest.mark.slow)
       for name in TINY},
    # ResNet-18's 20 convolutions take most of this file's compile time: slow.
    "resnet18_gn": pytest.param((lambda: _random_params(fs.models.resnet18_gn(10, width=4)),
                                 _toy_images), marks=pytest.mark.slow),
}


@pytest.mark.parametrize("case", ENGINE_CASES.values(), ids=ENGINE_CASES.keys())
def test_trains_under_the_vectorized_engine(case):
    make, data = case
    (model, init), train = make(), data()
    algo = fs.algorithms.fedavg(model, optax.adam(0.03), batch_size=4, num_epochs=2)
    # Both rounds train every client (cohort = population) on the same toy data.
    result = fs.simulate(algo, train, rounds=2, cohort_size=train.num_clients, chunk_size=2,
                         params=init, progress=False)
    first, second = (r["train_loss"] for r in result.history)
    assert np.isfinite(second) and second < first
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(result.params))


def test_resnet_forward_shape_and_examples_are_independent():
    full = jax.eval_shape(fs.models.resnet18_gn().init, jax.random.key(0))
    logits = jax.eval_shape(resnet._ResNet18GN(100, 2, 64).apply, {"params": full},
                            jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert logits.shape == (2, 100)
    # Independence on a narrow copy (the same blocks and GroupNorms), one compiled batch shape.
    model, params = _random_params(fs.models.resnet18_gn(100, width=8))
    loss = jax.jit(model.loss)
    a, b, c = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    y = np.array([3, 7], np.int32)
    key = jax.random.key(2)
    pair = loss(params, {"x": np.stack([a, b]), "y": y}, key)
    other = loss(params, {"x": np.stack([a, 5 * c]), "y": y}, key)
    blank = loss(params, {"x": np.stack([a, np.zeros_like(a)]), "y": y}, key)
    assert bool(jnp.all(jnp.isfinite(pair)))
    np.testing.assert_allclose(other[0], pair[0], rtol=1e-5)
    np.testing.assert_allclose(blank[0], pair[0], rtol=1e-5)
    assert not np.isclose(other[1], pair[1])
