"""Next-token prediction models: the Shakespeare char-LSTM, a small causal transformer, and the
StackOverflow word-LSTM, with masked per-token loss and accuracy.

Batches are `{"x": int32[B, T] input tokens, "y": int32[B, T] next tokens}`, padded at the end
with `PAD` (id 0). The models are causal, so a prediction never sees the trailing padding, and
every reduction over tokens skips PAD targets.

Vocabulary layouts (what a data loader must produce):
  Characters (FedJAX Shakespeare): PAD 0, BOS 1, EOS 2, the 86 characters 3..88, OOV 89;
    90 ids in all (`CHAR_BOS`, `CHAR_EOS`, `CHAR_OOV`, `CHAR_VOCAB_SIZE`).
  Words (TFF StackOverflow, Reddi et al.): PAD 0, the `vocab_size` words 1..vocab_size in
    vocabulary order, then `num_oov_buckets` OOV ids, then BOS, then EOS; `word_tokens`
    gives the ids. (FedJAX's StackOverflow tokenizer differs: BOS 1, EOS 2, words from 3.)

References:
  McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017 (Shakespeare char-LSTM).
  Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018.
  Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (StackOverflow word-LSTM and its
    accuracy without PAD/OOV/EOS).
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (the
    transformer's adapters).
  FedJAX `fedjax/datasets/shakespeare.py`, `fedjax/models/shakespeare.py`; TFF
    `tff.simulation.baselines.stackoverflow` (`get_special_tokens`, `create_recurrent_model`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax import lax

from fedjax_sim.checks import check_integer, check_number
from fedjax_sim.models.core import InputSpec, Model, Params

PAD = 0

CHAR_BOS = 1
CHAR_EOS = 2
CHAR_OOV = 89
CHAR_VOCAB_SIZE = 90


class WordTokens(NamedTuple):
    """Special token ids of the word vocabulary (TFF StackOverflow layout).

    Attributes:
      pad: 0.
      oov: the OOV bucket ids, right after the words.
      bos: beginning of sentence (never a target).
      eos: end of sentence (absent when a sentence was truncated to the maximum length).
      size: the number of ids, words and special tokens together (the model's output width).
    """

    pad: int
    oov: tuple[int, ...]
    bos: int
    eos: int
    size: int


def word_tokens(vocab_size: int = 10000, num_oov_buckets: int = 1) -> WordTokens:
    """The ids of the word vocabulary: word `i` of the vocabulary (0-based) has id `i + 1`.

    References: TFF `stackoverflow_word_prediction.get_special_tokens`.
    """
    if vocab_size < 1 or num_oov_buckets < 1:
        raise ValueError(f"vocab_size and num_oov_buckets must be >= 1, got {vocab_size} and "
                         f"{num_oov_buckets}")
    oov = tuple(range(vocab_size + 1, vocab_size + 1 + num_oov_buckets))
    bos = vocab_size + num_oov_buckets + 1
    return WordTokens(pad=PAD, oov=oov, bos=bos, eos=bos + 1, size=bos + 2)


def next_token_model(
    init: Callable[[jax.Array], Params],
    apply: Callable[..., jax.Array],
    vocab_size: int,
    *,
    accuracies: Mapping[str, Sequence[int]],
    x: str = "x",
    y: str = "y",
) -> Model:
    """A next-token `Model` from `apply(params, tokens, train=..., key=...) -> logits[B, T, V]`.

    The training loss of a sequence is its mean cross-entropy over its non-PAD targets (0 for a
    sequence with none), so every sequence weighs the same (FedJAX's Shakespeare loss divides by
    the padded length instead, which weighs short sequences less). The "loss" metric is a
    (sum, count) ratio over non-PAD target tokens, so evaluation gives the per-token loss. Each
    accuracy is (correct, count) over the non-PAD targets not listed in `accuracies[name]`.

    Args:
      init: `(key) -> params`.
      apply: the logits of every position; position t may only depend on tokens 0..t.
      vocab_size: the number of ids (the logits' last dimension), for label range checks.
      accuracies: {metric name: target ids excluded besides PAD}.
      x: the input token feature.
      y: the target token feature.

    References: TFF `keras_metrics.MaskedCategoricalAccuracy`; FedJAX
      `metrics.SequenceTokenAccuracy`.
    """
    excluded = {name: np.asarray(sorted(set(ids)), np.int32) for name, ids in accuracies.items()}

    def token_losses(logits, targets):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        valid = targets != PAD
        # where, not a product: logits at padded positions may be anything, even inf.
        return jnp.where(valid, ce, 0.0), valid.astype(jnp.float32)

    def loss(params, batch, key):
        ce, valid = token_losses(apply(params, batch[x], train=True, key=key), batch[y])
        return jnp.sum(ce, -1) / jnp.maximum(jnp.sum(valid, -1), 1.0)

    def metrics(params, batch):
        targets = batch[y]
        logits = apply(params, batch[x], train=False, key=None)
        ce, valid = token_losses(logits, targets)
        correct = jnp.argmax(logits, -1) == targets
        out = {"loss": (jnp.sum(ce, -1), jnp.sum(valid, -1))}
        for name, ids in excluded.items():
            counted = (targets != PAD) & ~jnp.isin(targets, ids)
            out[name] = (jnp.sum(correct & counted, -1, dtype=jnp.float32),
                         jnp.sum(counted, -1, dtype=jnp.float32))
        return out

    return Model(init=init, loss=loss, metrics=metrics, label=(y, vocab_size),
                 inputs=InputSpec(x, num_ids=vocab_size))


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        check_integer(name, value, 1)


def _from_module(module: nn.Module) -> tuple[Callable, Callable]:
    """`init` and `apply` of a Linen module mapping int tokens [B, T] to logits [B, T, V]."""

    @jax.jit  # one compiled program, not one per parameter shape when called eagerly
    def init(key):
        return module.init(key, jnp.zeros((1, 1), jnp.int32))["params"]

    def apply(params, tokens, *, train, key):
        del train, key  # these models have no dropout
        return module.apply({"params": params}, tokens)

    return init, apply


class _LSTMStack(nn.Module):
    """Embedding, stacked LSTMs with an optional dense projection after each, dense logits."""

    vocab_size: int
    embed_dim: int
    hidden: int
    num_layers: int
    projection: int | None = None

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(self.vocab_size, self.embed_dim)(tokens)
        for _ in range(self.num_layers):
            # nn.RNN scans over time: one compiled step, and it vmaps over clients.
            h = nn.RNN(nn.LSTMCell(self.hidden))(h)
            if self.projection is not None:
                h = nn.Dense(self.projection)(h)
        return nn.Dense(self.vocab_size)(h)


def char_lstm(vocab_size: int = CHAR_VOCAB_SIZE, embed_dim: int = 8, hidden: int = 256,
              num_layers: int = 2, *, x: str = "x", y: str = "y") -> Model:
    """The Shakespeare next-character LSTM of McMahan et al., LEAF and FedJAX: embedding 8, two
    LSTM layers of 256, dense to `vocab_size` (820,522 parameters for 90 ids).

    Parameters: `V*e + sum_l 4*(in_l + h + 1)*h + (h + 1)*V` with `in_1 = e`, `in_l = h` after.
    FedJAX also applies tanh to each LSTM output; LEAF and TFF do not, nor does this model.

    Metrics (character layout of the module docstring): "loss" per non-PAD target token;
    "accuracy" over non-PAD targets (TFF's and Reddi et al.'s Shakespeare accuracy, which masks
    only PAD); "accuracy_no_eos" also excludes EOS targets (FedJAX's `accuracy_no_eos`, as
    intended: FedJAX's model code takes EOS to be `vocab_size + 2` while its data set uses 2).
    FedJAX's `accuracy_in_vocab` also removes special tokens from the prediction; it is not
    reproduced.

    References: McMahan et al. 2017; Caldas et al. 2018 (LEAF); FedJAX
      `fedjax/models/shakespeare.py`.
    """
    _check_sizes(vocab_size=vocab_size, embed_dim=embed_dim, hidden=hidden,
                 num_layers=num_layers)
    init, apply = _from_module(_LSTMStack(vocab_size, embed_dim, hidden, num_layers))
    return next_token_model(init, apply, vocab_size,
                            accuracies={"accuracy": (), "accuracy_no_eos": (CHAR_EOS,)},
                            x=x, y=y)


def word_lstm(vocab_size: int = 10000, embed_dim: int = 96, hidden: int = 670,
              projection: int = 96, num_oov_buckets: int = 1, *, x: str = "x",
              y: str = "y") -> Model:
    """The StackOverflow next-word LSTM of Reddi et al. (2021): embedding 96, one LSTM of 670,
    dense projection to 96, dense to the `word_tokens(vocab_size, num_oov_buckets).size` ids
    (4,050,748 parameters for 10,000 words and one OOV bucket, as in the paper's TFF code).

    Token ids follow `word_tokens`. Metrics: "loss" over every non-PAD target token (OOV and
    EOS included); "accuracy" over non-PAD targets that are neither OOV nor EOS (Reddi et al.'s
    `accuracy_no_oov_or_eos`; BOS is never a target). A predicted OOV or EOS for a word target
    counts as wrong, as in TFF.

    References: Reddi et al., "Adaptive Federated Optimization", ICLR 2021; TFF
      `tff.simulation.baselines.stackoverflow`.
    """
    _check_sizes(vocab_size=vocab_size, embed_dim=embed_dim, hidden=hidden,
                 projection=projection, num_oov_buckets=num_oov_buckets)
    tokens = word_tokens(vocab_size, num_oov_buckets)
    init, apply = _from_module(_LSTMStack(tokens.size, embed_dim, hidden, 1, projection))
    return next_token_model(init, apply, tokens.size,
                            accuracies={"accuracy": (*tokens.oov, tokens.eos)}, x=x, y=y)


class _LoRADot(nn.Module):
    """A Flax Dense layer's `dot_general` (its `dot_general_cls`) with LoRA's low-rank update
    beside the kernel: `x W + scale (x A) B`, A random and B zero, so the adapted layer starts
    as the base layer. A's variance is 1 / fan-in (a Dense kernel's LeCun normal), so `x A` is
    at the scale of `x` whatever the width and `scale` alone sets the adapter's."""

    rank: int
    scale: float

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None):
        (lhs_axes, rhs_axes), batch = dimension_numbers
        n = len(rhs_axes)  # Dense and DenseGeneral contract the kernel's leading axes
        if rhs_axes != tuple(range(n)) or batch != ((), ()):
            raise NotImplementedError(f"LoRA of a dot_general {dimension_numbers}")
        init_a = nn.initializers.lecun_normal(in_axis=tuple(range(n)), out_axis=-1)
        a = self.param("a", init_a, (*rhs.shape[:n], self.rank))
        b = self.param("b", nn.initializers.zeros, (self.rank, *rhs.shape[n:]))
        low = lax.dot_general(lhs, a, ((lhs_axes, tuple(range(n))), ((), ())),
                              precision=precision)
        return (lax.dot_general(lhs, rhs, dimension_numbers, precision=precision)
                + self.scale * jnp.tensordot(low, b, 1, precision=precision))


class _CausalTransformer(nn.Module):
    vocab_size: int
    max_len: int
    d_model: int
    num_heads: int
    num_layers: int
    mlp_dim: int
    lora_rank: int = 0
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, tokens):
        length = tokens.shape[-1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        # Each adapted Dense builds its own adapter, a child named "lora"; rank 0 passes
        # None, Flax's default, so the model is the plain one.
        lora = (functools.partial(_LoRADot, self.lora_rank, self.lora_scale, name="lora")
                if self.lora_rank else None)
        pos = self.param("position_embedding", nn.initializers.normal(0.02),
                         (self.max_len, self.d_model))
        h = nn.Embed(self.vocab_size, self.d_model)(tokens) + pos[:length]
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.num_layers):
            a = nn.LayerNorm()(h)
            h = h + nn.MultiHeadDotProductAttention(
                self.num_heads, qkv_dot_general_cls=lora, out_dot_general_cls=lora)(
                    a, a, mask=mask)
            m = nn.Dense(self.mlp_dim, dot_general_cls=lora)(nn.LayerNorm()(h))
            h = h + nn.Dense(self.d_model, dot_general_cls=lora)(nn.gelu(m))
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(h))


def causal_transformer(vocab_size: int = CHAR_VOCAB_SIZE, *, max_len: int = 128,
                       d_model: int = 128, num_heads: int = 4, num_layers: int = 2,
                       mlp_dim: int | None = None, lora_rank: int = 0,
                       lora_alpha: float | None = None, eos: int | None = CHAR_EOS,
                       x: str = "x", y: str = "y") -> Model:
    """A small decoder-only transformer: learned token and position embeddings, `num_layers`
    pre-LayerNorm blocks (causal multi-head self-attention, GELU MLP of `mlp_dim`, default
    4*d_model), a final LayerNorm and dense logits. No dropout.

    Padding must be trailing: the causal mask alone keeps it out of every real position.
    Metrics are those of `char_lstm` ("loss", "accuracy", and "accuracy_no_eos" when `eos` is
    not None, so the same model serves other vocabularies).

    LoRA (Hu et al.): with `lora_rank` r > 0, each block's query, key, value and output
    projections and both MLP layers compute `W x + (lora_alpha / r) B A x`, W the layer's
    kernel, with adapters A (random) and B (zero, so the adapted model starts as the base)
    under `<layer>/lora/a` and `<layer>/lora/b`; the embeddings, LayerNorms and logits layer
    have none. The base leaves keep the plain model's paths and shapes (and, for
    the same key, its initial values), so `fs.filters.with_base` loads a trained base and
    `trainable="lora"` trains the adapters alone. Every linear layer is adapted, not just the
    paper's query and value: adapting them all brought LoRA closest to full fine-tuning in
    Dettmers et al. (QLoRA, 2023). `lora_alpha` defaults to r (scale 1; the paper fixes alpha
    at the first r tried). Rank 0 is the plain model.

    Example (fine-tuning the adapters of a trained base):
      >>> lora = causal_transformer(lora_rank=4)                        # doctest: +SKIP
      >>> params = fs.filters.with_base(lora.init(key), base_params)   # doctest: +SKIP
      >>> algo = fs.algorithms.fedavg(lora, optax.adam(1e-3), trainable="lora")  # doctest: +SKIP

    References: Vaswani et al., "Attention Is All You Need", NeurIPS 2017; Radford et al.,
      "Language Models are Unsupervised Multitask Learners", 2019 (pre-LN decoder); Hu et al.,
      "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022; Dettmers et al.,
      "QLoRA: Efficient Finetuning of Quantized LLMs", NeurIPS 2023.
    """
    _check_sizes(vocab_size=vocab_size, max_len=max_len, d_model=d_model, num_heads=num_heads,
                 num_layers=num_layers, mlp_dim=mlp_dim or 4 * d_model)
    if d_model % num_heads:
        raise ValueError(f"d_model {d_model} must be a multiple of num_heads {num_heads} (each "
                         "head takes d_model / num_heads features)")
    check_integer("lora_rank", lora_rank, 0)
    if lora_alpha is not None and not lora_rank:
        raise ValueError(f"lora_alpha={lora_alpha} is set but lora_rank is 0 (no adapters)")
    alpha = lora_rank if lora_alpha is None else check_number("lora_alpha", lora_alpha,
                                                               above=0)
    module = _CausalTransformer(vocab_size, max_len, d_model, num_heads, num_layers,
                                mlp_dim or 4 * d_model, lora_rank,
                                alpha / lora_rank if lora_rank else 1.0)
    init, apply = _from_module(module)
    accuracies = {"accuracy": ()} if eos is None else {"accuracy": (), "accuracy_no_eos": (eos,)}
    return next_token_model(init, apply, vocab_size, accuracies=accuracies, x=x, y=y)
