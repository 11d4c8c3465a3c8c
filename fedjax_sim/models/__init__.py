"""Models: the `Model` interface, adapters from Flax and functions, and built-in models."""

from fedjax_sim.models.adapters import from_function, from_linen, from_nnx
from fedjax_sim.models.core import InputSpec, Model, classifier
from fedjax_sim.models.resnet import resnet18_gn
from fedjax_sim.models.sequence import (
    CHAR_BOS,
    CHAR_EOS,
    CHAR_OOV,
    CHAR_VOCAB_SIZE,
    PAD,
    WordTokens,
    causal_transformer,
    char_lstm,
    next_token_model,
    word_lstm,
    word_tokens,
)
from fedjax_sim.models.zoo import emnist_cnn, logistic_regression, mlp, num_params

__all__ = [
    "CHAR_BOS",
    "CHAR_EOS",
    "CHAR_OOV",
    "CHAR_VOCAB_SIZE",
    "InputSpec",
    "Model",
    "PAD",
    "WordTokens",
    "causal_transformer",
    "char_lstm",
    "classifier",
    "emnist_cnn",
    "from_function",
    "from_linen",
    "from_nnx",
    "logistic_regression",
    "mlp",
    "next_token_model",
    "num_params",
    "resnet18_gn",
    "word_lstm",
    "word_tokens",
]
