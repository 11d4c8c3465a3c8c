"""The run configuration: one TOML file describes a run, checked against typed dataclasses.

A config is a tree of frozen dataclasses (`Config` at the root). A section that picks one of
several kinds of thing (a data set, a model, an algorithm, an optimizer, a robust rule, ...)
is a `Variant`: its TOML table names the kind with `name` and holds that kind's own options,
e.g. `[aggregation.rule]` with `name = "krum"` and `f = 2`; a bare string (`rule = "median"`)
is the kind with its defaults. Every kind is registered under its name in its group, and
`fedjax-sim list` prints the groups (`describe`). Building the objects a config describes is
`fedjax_sim.experiment`'s job; this module only reads, checks and writes configs.

TOML has no null: an option typed `X | None` defaults to None (the library's own default,
or a value derived from the rest of the run, as its docstring says) and is set by giving it a
value; the written config leaves it out while it is None.

Example:
  >>> cfg = load(overrides=["run.rounds=5", "aggregation.rule=median"])
  >>> cfg.run.rounds, cfg.aggregation.rule.name
  (5, 'median')
  >>> load(text=dumps(cfg)) == cfg
  True
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import tomli_w

from fedjax_sim import sinks


class ConfigError(ValueError):
    """A config that does not fit the schema, or whose options do not fit together."""


class Variant:
    """A section that is one of several registered kinds, named by its `name` key.

    A direct subclass given `group=` is a kind of section (abstract, no options of its own
    unless every kind shares them); its subclasses given `name=` are the kinds, each a frozen
    dataclass of its options, documented in its docstring.
    """

    name: ClassVar[str]
    group: ClassVar[str]
    registry: ClassVar[dict[str, type[Variant]]]

    def __init_subclass__(cls, group: str | None = None, name: str | None = None, **kw):
        super().__init_subclass__(**kw)
        if group is not None:
            cls.group, cls.registry = group, {}
        if name is not None:
            if name in cls.registry:
                raise TypeError(f"{cls.group}: {name!r} is registered twice")
            cls.name = name
            cls.registry[name] = cls


def _kinds(base: type[Variant]) -> str:
    return ", ".join(sorted(base.registry))


# --- schedules and optimizers ------------------------------------------------------------


class Schedule(Variant, group="schedules"):
    """A learning-rate schedule from the optimizer's `learning_rate` (its initial value).

    Attributes:
      over: "steps" (the optimizer's own steps: local steps for a client optimizer, rounds
        for the server's) or "rounds" (client optimizers only: the schedule's value at the
        round is the client's learning rate for that whole round).
    """

    over: Literal["steps", "rounds"]


@dataclass(frozen=True)
class Constant(Schedule, name="constant"):
    """The learning rate, unchanged."""

    over: Literal["steps", "rounds"] = "steps"


@dataclass(frozen=True)
class CosineDecay(Schedule, name="cosine_decay"):
    """optax.cosine_decay_schedule: from the learning rate to `alpha` times it.

    Attributes:
      over: as in `Schedule`.
      decay_steps: steps (or rounds) to the end value.
      alpha: the end value over the initial one.
    """

    over: Literal["steps", "rounds"] = "steps"
    decay_steps: int = 100
    alpha: float = 0.0


@dataclass(frozen=True)
class ExponentialDecay(Schedule, name="exponential_decay"):
    """optax.exponential_decay: lr * decay_rate ** (step / transition_steps).

    Attributes:
      over: as in `Schedule`.
      transition_steps: steps per factor of `decay_rate`.
      decay_rate: the factor.
      staircase: decay in whole steps of `transition_steps`.
    """

    over: Literal["steps", "rounds"] = "steps"
    transition_steps: int = 100
    decay_rate: float = 0.5
    staircase: bool = False


@dataclass(frozen=True)
class Linear(Schedule, name="linear"):
    """optax.linear_schedule from the learning rate to `end_value`.

    Attributes:
      over: as in `Schedule`.
      end_value: the last value.
      transition_steps: steps to reach it.
    """

    over: Literal["steps", "rounds"] = "steps"
    end_value: float = 0.0
    transition_steps: int = 100


@dataclass(frozen=True)
class WarmupCosineDecay(Schedule, name="warmup_cosine_decay"):
    """optax.warmup_cosine_decay_schedule: linear warmup from `init_value` to the learning
    rate, then cosine decay to `end_value`.

    Attributes:
      over: as in `Schedule`.
      warmup_steps: steps of the warmup.
      decay_steps: total steps, warmup included.
      init_value: the first value.
      end_value: the last value.
    """

    over: Literal["steps", "rounds"] = "steps"
    warmup_steps: int = 10
    decay_steps: int = 100
    init_value: float = 0.0
    end_value: float = 0.0


@dataclass(frozen=True)
class PiecewiseConstant(Schedule, name="piecewise_constant"):
    """optax.piecewise_constant_schedule: the rate multiplied by `scales[i]` at
    `boundaries[i]`.

    Attributes:
      over: as in `Schedule`.
      boundaries: the steps at which the rate changes.
      scales: the factor at each boundary (as many as boundaries).
    """

    over: Literal["steps", "rounds"] = "steps"
    boundaries: tuple[int, ...] = ()
    scales: tuple[float, ...] = ()


class Optimizer(Variant, group="optimizers"):
    """An optax optimizer, for the clients' local steps or the server's update.

    Attributes:
      learning_rate: the step size (a schedule's initial value).
      schedule: how the learning rate changes (`Schedule`).
    """

    learning_rate: float
    schedule: Schedule


@dataclass(frozen=True)
class Sgd(Optimizer, name="sgd"):
    """optax.sgd; at learning rate 1 on the server, FedAvg's plain average.

    Attributes:
      learning_rate: the step size.
      momentum: heavy-ball momentum (None: none).
      nesterov: Nesterov's momentum.
      schedule: the learning-rate schedule.
    """

    learning_rate: float = 1.0
    momentum: float | None = None
    nesterov: bool = False
    schedule: Schedule = Constant()


@dataclass(frozen=True)
class Adam(Optimizer, name="adam"):
    """optax.adam.

    Attributes:
      learning_rate: the step size.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to the denominator.
      schedule: the learning-rate schedule.
    """

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: Schedule = Constant()


@dataclass(frozen=True)
class Adagrad(Optimizer, name="adagrad"):
    """optax.adagrad.

    Attributes:
      learning_rate: the step size.
      initial_accumulator_value: the accumulator's start.
      eps: added to the denominator.
      schedule: the learning-rate schedule.
    """

    learning_rate: float = 0.1
    initial_accumulator_value: float = 0.1
    eps: float = 1e-7
    schedule: Schedule = Constant()


@dataclass(frozen=True)
class Rmsprop(Optimizer, name="rmsprop"):
    """optax.rmsprop.

    Attributes:
      learning_rate: the step size.
      decay: the second-moment decay.
      eps: added to the denominator.
      momentum: momentum (None: none).
      schedule: the learning-rate schedule.
    """

    learning_rate: float = 1e-3
    decay: float = 0.9
    eps: float = 1e-8
    momentum: float | None = None
    schedule: Schedule = Constant()


@dataclass(frozen=True)
class Yogi(Optimizer, name="yogi"):
    """optax.yogi.

    Attributes:
      learning_rate: the step size.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to the denominator.
      schedule: the learning-rate schedule.
    """

    learning_rate: float = 1e-2
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-3
    schedule: Schedule = Constant()


@dataclass(frozen=True)
class FedAvgM(Optimizer, name="fedavgm"):
    """fs.algorithms.fedavgm: server SGD with momentum (Hsu et al. 2019).

    Attributes:
      learning_rate: the server step.
      momentum: the momentum.
      schedule: the learning-rate schedule (over rounds).
    """

    learning_rate: float = 1.0
    momentum: float = 0.9
    schedule: Schedule = Constant()


@dataclass(frozen=True)
class FedAdam(Optimizer, name="fedadam"):
    """fs.algorithms.fedadam: Reddi et al. (2021)'s server Adam.

    Attributes:
      learning_rate: the server step.
      b1: first-moment decay.
      b2: second-moment decay.
      tau: the adaptivity (added to the root of the second moment).
      schedule: the learning-rate schedule (over rounds).
    """

    learning_rate: float = 1e-2
    b1: float = 0.9
    b2: float = 0.99
    tau: float = 1e-3
    schedule: Schedule = Constant()


@dataclass(frozen=True)
class FedYogi(Optimizer, name="fedyogi"):
    """fs.algorithms.fedyogi: Reddi et al. (2021)'s server Yogi.

    Attributes:
      learning_rate: the server step.
      b1: first-moment decay.
      b2: second-moment decay.
      tau: the adaptivity.
      schedule: the learning-rate schedule (over rounds).
    """

    learning_rate: float = 1e-2
    b1: float = 0.9
    b2: float = 0.99
    tau: float = 1e-3
    schedule: Schedule = Constant()


@dataclass(frozen=True)
class FedAdagrad(Optimizer, name="fedadagrad"):
    """fs.algorithms.fedadagrad: Reddi et al. (2021)'s server Adagrad.

    Attributes:
      learning_rate: the server step.
      b1: first-moment decay.
      tau: the adaptivity.
      schedule: the learning-rate schedule (over rounds).
    """

    learning_rate: float = 1e-1
    b1: float = 0.9
    tau: float = 1e-3
    schedule: Schedule = Constant()


# --- data sets ---------------------------------------------------------------------------


class Dataset(Variant, group="datasets"):
    """A federated data set: a training population and, where the loader gives one, a test
    population (`fs.data`). Paths are read relative to the working directory."""


@dataclass(frozen=True)
class Synthetic(Dataset, name="synthetic"):
    """fs.data.synthetic: FedProx's Synthetic(alpha, beta), 60 features, 10 classes.

    Attributes:
      alpha: how much the clients' models differ.
      beta: how much the clients' inputs differ.
      num_clients: the population.
      iid: FedProx's IID variant (one global model; alpha and beta unused).
      test_fraction: each client's share of test examples.
      num_examples: examples per client before the split (None: FedProx's log-normal).
      max_examples_per_client: a cap on each client's examples (None: none).
      seed: the generator's seed (None: the run's seed).
    """

    alpha: float = 1.0
    beta: float = 1.0
    num_clients: int = 1000
    iid: bool = False
    test_fraction: float = 0.1
    num_examples: int | None = None
    max_examples_per_client: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Femnist(Dataset, name="femnist"):
    """fs.data.femnist: LEAF's FEMNIST writers (28x28 images, 62 classes).

    Attributes:
      path: the .npz of LEAF writers (None: the 105 writers in ../shared/data).
      normalize: scale pixels to [0, 1] with ink 1.
      only_digits: the 10 digit classes only.
    """

    path: str | None = None
    normalize: bool = True
    only_digits: bool = False


@dataclass(frozen=True)
class Shakespeare(Dataset, name="shakespeare"):
    """fs.data.shakespeare: Tiny Shakespeare by speaking role, next-character sequences.

    Attributes:
      path: the corpus (None: ../shared/data/tinyshakespeare/input.txt).
      sequence_length: characters per example.
      test_fraction: each role's share of test speeches.
      seed: the split's seed (None: the run's seed).
    """

    path: str | None = None
    sequence_length: int = 80
    test_fraction: float = 0.2
    seed: int | None = None


@dataclass(frozen=True)
class Leaf(Dataset, name="leaf"):
    """fs.data.load_leaf: LEAF JSON files (a file or a directory of them).

    Attributes:
      path: the training JSON file or directory.
      test_path: the test JSON file or directory (None: split off `test_fraction`).
      test_fraction: each client's test share when there is no `test_path` (0: no test set).
      x_shape: the per-example shape of "x" (None: as stored, flat).
    """

    path: str = ""
    test_path: str | None = None
    test_fraction: float = 0.0
    x_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TffSqlite(Dataset, name="tff_sqlite"):
    """fs.data.load_tff_sqlite: a TensorFlow Federated SQLite file (no TensorFlow needed).

    Attributes:
      path: the .sqlite file.
      train_split: the training split's name.
      test_split: the test split's name ("": none).
      features: the features kept (None: all).
    """

    path: str = ""
    train_split: str = "train"
    test_split: str = "test"
    features: tuple[str, ...] | None = None


@dataclass(frozen=True)
class FedjaxSqlite(Dataset, name="fedjax_sqlite"):
    """fs.data.load_fedjax_sqlite: FedJAX's SQLite format.

    Attributes:
      path: the training file.
      test_path: the test file (None: split off `test_fraction`).
      test_fraction: each client's test share when there is no `test_path` (0: no test set).
    """

    path: str = ""
    test_path: str | None = None
    test_fraction: float = 0.0


@dataclass(frozen=True)
class Npy(Dataset, name="npy"):
    """fs.data.storage.load_npy: a population saved by `save_npy`, memory-mapped and read
    per cohort (populations larger than memory).

    Attributes:
      path: the directory `save_npy` wrote.
      test_path: the test population's directory (None: no test set).
    """

    path: str = ""
    test_path: str | None = None


@dataclass(frozen=True)
class StoreSqlite(Dataset, name="store_sqlite"):
    """fs.data.storage.load_sqlite: a population saved by `save_sqlite`, read per cohort.

    Attributes:
      path: the SQLite file `save_sqlite` wrote.
      test_path: the test population's file (None: no test set).
    """

    path: str = ""
    test_path: str | None = None


@dataclass(frozen=True)
class EmnistTff(Dataset, name="emnist_tff"):
    """fs.data.emnist_tff: TFF's EMNIST SQLite (3,400 writers).

    Attributes:
      path: the .sqlite file (None: the download cache).
      only_digits: the 10 digit classes only.
      normalize: ink 1 on a background of 0.
    """

    path: str | None = None
    only_digits: bool = False
    normalize: bool = True


@dataclass(frozen=True)
class EmnistFedjax(Dataset, name="emnist_fedjax"):
    """fs.data.emnist_fedjax: FedJAX's EMNIST SQLite files.

    Attributes:
      train_path: the training file (None: the download cache).
      test_path: the test file (None: the download cache).
      only_digits: the 10 digit classes only.
      normalize: ink 1 on a background of 0.
    """

    train_path: str | None = None
    test_path: str | None = None
    only_digits: bool = False
    normalize: bool = True


@dataclass(frozen=True)
class Cifar100Tff(Dataset, name="cifar100_tff"):
    """fs.data.cifar100_tff: TFF's CIFAR-100 (500 clients, 100 classes).

    Attributes:
      path: the .sqlite file (None: the download cache).
      normalize: standardize pixels per channel.
    """

    path: str | None = None
    normalize: bool = False


@dataclass(frozen=True)
class ShakespeareTff(Dataset, name="shakespeare_tff"):
    """fs.data.shakespeare_tff: TFF's Shakespeare SQLite.

    Attributes:
      path: the .sqlite file (None: the download cache).
      sequence_length: characters per example.
    """

    path: str | None = None
    sequence_length: int = 80


@dataclass(frozen=True)
class StackoverflowTff(Dataset, name="stackoverflow_tff"):
    """fs.data.stackoverflow_tff: TFF's Stack Overflow next-word prediction.

    Attributes:
      path: the .sqlite file (None: the download cache).
      vocab_size: the most frequent words kept.
      max_length: tokens per sentence.
      num_oov_buckets: out-of-vocabulary buckets.
    """

    path: str | None = None
    vocab_size: int = 10000
    max_length: int = 20
    num_oov_buckets: int = 1


@dataclass(frozen=True)
class Partition(Dataset, name="partition"):
    """Centralized data dealt to clients by `fs.data.partition`.

    The examples are the arrays of an .npz file (`path`: every array one row per example,
    e.g. "x" and "y") or the pooled training examples of a data set named in `pool`.

    Attributes:
      path: the .npz of centralized arrays (or give `pool`).
      pool: a data set name whose training examples are pooled (e.g. "femnist").
      pool_path: the pooled data set's path (None: its loader's default).
      scheme: iid, dirichlet (label skew), quantity_skew, shards (McMahan et al.'s
        pathological split) or natural (an id column).
      num_clients: the clients to deal to (not for natural).
      alpha: dirichlet's concentration.
      shards_per_client: shards' shards per client.
      sigma: quantity_skew's log-normal spread.
      id_column: natural's client-id feature.
      label: the label feature.
      seed: the partition's seed (None: the run's seed).
      test_fraction: each client's test share (0: no test set).
    """

    path: str | None = None
    pool: str | None = None
    pool_path: str | None = None
    scheme: Literal["iid", "dirichlet", "quantity_skew", "shards", "natural"] = "iid"
    num_clients: int = 100
    alpha: float = 0.5
    shards_per_client: int = 2
    sigma: float = 1.0
    id_column: str = "client"
    label: str = "y"
    seed: int | None = None
    test_fraction: float = 0.0


# --- models ------------------------------------------------------------------------------


class ModelSpec(Variant, group="models"):
    """A model of the zoo (`fs.models`). Sizes given as None come from the data set (its
    feature shape, classes or vocabulary); dense models see each example's features
    flattened.

    Attributes:
      params: a params.msgpack (a run's final params) to start from (None: initialized).
      base_params: a params.msgpack of a base model loaded into this one's matching leaves
        (`fs.filters.with_base`: LoRA adapters keep their own initialization).
    """

    params: str | None
    base_params: str | None


@dataclass(frozen=True)
class LogisticRegression(ModelSpec, name="logistic_regression"):
    """fs.models.logistic_regression.

    Attributes:
      num_classes: the classes (None: the data set's).
      params: see `ModelSpec`.
      base_params: see `ModelSpec`.
    """

    num_classes: int | None = None
    params: str | None = None
    base_params: str | None = None


@dataclass(frozen=True)
class Mlp(ModelSpec, name="mlp"):
    """fs.models.mlp: dense layers with ReLU.

    Attributes:
      hidden: the hidden layers' widths.
      num_classes: the classes (None: the data set's).
      params: see `ModelSpec`.
      base_params: see `ModelSpec`.
    """

    hidden: tuple[int, ...] = (200,)
    num_classes: int | None = None
    params: str | None = None
    base_params: str | None = None


@dataclass(frozen=True)
class EmnistCnn(ModelSpec, name="emnist_cnn"):
    """fs.models.emnist_cnn: Reddi et al.'s EMNIST CNN (1.2M parameters).

    Attributes:
      num_classes: the classes (None: the data set's).
      params: see `ModelSpec`.
      base_params: see `ModelSpec`.
    """

    num_classes: int | None = None
    params: str | None = None
    base_params: str | None = None


@dataclass(frozen=True)
class Resnet18Gn(ModelSpec, name="resnet18_gn"):
    """fs.models.resnet18_gn: ResNet-18 with group norm (CIFAR-100 in Reddi et al.).

    Attributes:
      num_classes: the classes (None: the data set's).
      groups: group-norm groups.
      width: the first stage's channels.
      params: see `ModelSpec`.
      base_params: see `ModelSpec`.
    """

    num_classes: int | None = None
    groups: int = 2
    width: int = 64
    params: str | None = None
    base_params: str | None = None


@dataclass(frozen=True)
class CharLstm(ModelSpec, name="char_lstm"):
    """fs.models.char_lstm: the Shakespeare next-character LSTM.

    Attributes:
      vocab_size: the characters.
      embed_dim: the embedding width.
      hidden: the LSTM width.
      num_layers: LSTM layers.
      params: see `ModelSpec`.
      base_params: see `ModelSpec`.
    """

    vocab_size: int = 90
    embed_dim: int = 8
    hidden: int = 256
    num_layers: int = 2
    params: str | None = None
    base_params: str | None = None


@dataclass(frozen=True)
class WordLstm(ModelSpec, name="word_lstm"):
    """fs.models.word_lstm: the Stack Overflow next-word LSTM.

    Attributes:
      vocab_size: the words (None: the data set's).
      embed_dim: the embedding width.
      hidden: the LSTM width.
      projection: the output projection's width.
      num_oov_buckets: out-of-vocabulary buckets.
      params: see `ModelSpec`.
      base_params: see `ModelSpec`.
    """

    vocab_size: int | None = None
    embed_dim: int = 96
    hidden: int = 670
    projection: int = 96
    num_oov_buckets: int = 1
    params: str | None = None
    base_params: str | None = None


@dataclass(frozen=True)
class CausalTransformer(ModelSpec, name="causal_transformer"):
    """fs.models.causal_transformer: a decoder-only transformer, optionally with LoRA.

    Attributes:
      vocab_size: the tokens.
      max_len: the longest sequence (None: the data's sequence length).
      d_model: the model width.
      num_heads: attention heads.
      num_layers: blocks.
      mlp_dim: the MLP width (None: 4 d_model).
      lora_rank: LoRA adapters' rank (0: none).
      lora_alpha: LoRA's alpha (None: the rank).
      params: see `ModelSpec`.
      base_params: see `ModelSpec`.
    """

    vocab_size: int = 90
    max_len: int | None = None
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    mlp_dim: int | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    params: str | None = None
    base_params: str | None = None


# --- algorithms --------------------------------------------------------------------------


class Algorithm(Variant, group="algorithms"):
    """A federated algorithm (`fs.algorithms`). The client optimizer is `[client_optimizer]`,
    the server's `[server_optimizer]`; algorithms whose clients step plain SGD (SCAFFOLD,
    FedNova, q-FFL, pFedMe) take its learning rate and refuse another client optimizer.

    Attributes:
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
    """

    batch_size: int
    num_epochs: int
    max_steps: int | None


@dataclass(frozen=True)
class FedAvg(Algorithm, name="fedavg"):
    """fs.algorithms.fedavg (FedOpt: any client and server optimizer).

    Attributes:
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
      drop_remainder: skip each client's last partial batch.
      max_examples_per_client: a larger client trains on its first this-many (None: all).
      shuffle: shuffle each client's examples every round.
      mu: FedProx's proximal weight (0: FedAvg).
      straggler_fraction: the share of each cohort that runs a random number of epochs.
      drop_stragglers: leave stragglers out (FedAvg's rule) instead of keeping their work.
      trainable: train and send only the parameters whose path matches this regex (None:
        all).
      example_dp_clip: DP-SGD inside the clients: the per-example clip (None: off).
      example_dp_noise: DP-SGD's noise multiplier (with `example_dp_clip`).
    """

    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None
    drop_remainder: bool = False
    max_examples_per_client: int | None = None
    shuffle: bool = True
    mu: float = 0.0
    straggler_fraction: float = 0.0
    drop_stragglers: bool = False
    trainable: str | None = None
    example_dp_clip: float | None = None
    example_dp_noise: float = 0.0


@dataclass(frozen=True)
class FedSgd(Algorithm, name="fedsgd"):
    """fs.algorithms.fedsgd: one full-batch gradient per client; the client optimizer is
    unused.

    Attributes:
      batch_size: unused by FedSGD's full batch (kept for the shared schema).
      num_epochs: unused.
      max_steps: unused.
    """

    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None


@dataclass(frozen=True)
class FedProx(Algorithm, name="fedprox"):
    """fs.algorithms.fedprox (Li et al. 2020): FedAvg with a proximal term.

    Attributes:
      mu: the proximal weight.
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
      max_examples_per_client: a cap on each client's examples (None: all).
      straggler_fraction: the share of each cohort that runs a random number of epochs.
      drop_stragglers: leave stragglers out instead of keeping their partial work.
    """

    mu: float = 0.01
    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None
    max_examples_per_client: int | None = None
    straggler_fraction: float = 0.0
    drop_stragglers: bool = False


@dataclass(frozen=True)
class _PlainSgd(Algorithm):
    """Shared options of the algorithms whose clients step plain SGD.

    Attributes:
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
      max_examples_per_client: a cap on each client's examples (None: all).
    """

    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None
    max_examples_per_client: int | None = None


@dataclass(frozen=True)
class Scaffold(_PlainSgd, name="scaffold"):
    """fs.algorithms.scaffold (Karimireddy et al. 2020): control variates in the client store.

    Attributes:
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
      max_examples_per_client: a cap on each client's examples (None: all).
    """


@dataclass(frozen=True)
class FedNova(_PlainSgd, name="fednova"):
    """fs.algorithms.fednova (Wang et al. 2020): normalized averaging.

    Attributes:
      momentum: the clients' SGD momentum.
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
      max_examples_per_client: a cap on each client's examples (None: all).
    """

    momentum: float = 0.0


@dataclass(frozen=True)
class QFfl(_PlainSgd, name="qffl"):
    """fs.algorithms.qffl (Li et al. 2020): q-FedAvg, fair resource allocation.

    Attributes:
      q: the fairness exponent (0: FedAvg's objective).
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
      max_examples_per_client: a cap on each client's examples (None: all).
    """

    q: float = 1.0


@dataclass(frozen=True)
class FedDyn(Algorithm, name="feddyn"):
    """fs.algorithms.feddyn (Acar et al. 2021): dynamic regularization.

    Attributes:
      alpha: the regularizer's weight.
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
      max_examples_per_client: a cap on each client's examples (None: all).
    """

    alpha: float = 0.01
    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None
    max_examples_per_client: int | None = None


@dataclass(frozen=True)
class Mime(Algorithm, name="mime"):
    """fs.algorithms.mime (Karimireddy et al. 2021): the client optimizer is the update rule
    the clients step under its frozen server state; the server optimizer is unused.

    Attributes:
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
      max_examples_per_client: a cap on each client's examples (None: all).
    """

    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None
    max_examples_per_client: int | None = None


@dataclass(frozen=True)
class MimeLite(Algorithm, name="mimelite"):
    """fs.algorithms.mimelite: Mime without the SVRG correction.

    Attributes:
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
      max_examples_per_client: a cap on each client's examples (None: all).
    """

    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None
    max_examples_per_client: int | None = None


@dataclass(frozen=True)
class AgnosticFedAvg(Algorithm, name="agnostic_fedavg"):
    """fs.algorithms.agnostic_fedavg (Mohri et al. 2019): the worst mixture of domains.

    Attributes:
      num_domains: the domains.
      domain: the feature holding each example's domain.
      domain_lr: the mixture weights' step.
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
    """

    num_domains: int = 2
    domain: str = "domain"
    domain_lr: float = 0.1
    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None


@dataclass(frozen=True)
class Ditto(Algorithm, name="ditto"):
    """fs.algorithms.ditto (Li et al. 2021): a personal model per client, pulled toward the
    global one.

    Attributes:
      lam: the pull toward the global model.
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
    """

    lam: float = 0.1
    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None


@dataclass(frozen=True)
class Apfl(Algorithm, name="apfl"):
    """fs.algorithms.apfl (Deng et al. 2020): a per-client mixture of personal and global.

    Attributes:
      alpha: the initial mixing weight.
      adaptive_alpha: adapt the weight every step.
      alpha_lr: its step (None: the client learning rate).
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
    """

    alpha: float = 0.5
    adaptive_alpha: bool = True
    alpha_lr: float | None = None
    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None


@dataclass(frozen=True)
class PFedMe(Algorithm, name="pfedme"):
    """fs.algorithms.pfedme (T. Dinh et al. 2020): Moreau-envelope personalization.

    Attributes:
      lam: the regularization toward the global model.
      inner_steps: steps on the personal problem per local step.
      personal_lr: its step (None: the client learning rate).
      eta: the local model's step (None: the client learning rate).
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
    """

    lam: float = 0.1
    inner_steps: int = 5
    personal_lr: float | None = None
    eta: float | None = None
    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None


@dataclass(frozen=True)
class FedRep(Algorithm, name="fedrep"):
    """fs.algorithms.fedrep (Collins et al. 2021): a personal head, a shared body.

    Attributes:
      head: the personal head, a regex over parameter paths.
      head_steps: local steps on the head before the body's.
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
    """

    head: str = "Dense_1"
    head_steps: int = 10
    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None


@dataclass(frozen=True)
class FedPer(Algorithm, name="fedper"):
    """fs.algorithms.fedper (Arivazhagan et al. 2019): a personal head trained with the body.

    Attributes:
      head: the personal head, a regex over parameter paths.
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
    """

    head: str = "Dense_1"
    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None


@dataclass(frozen=True)
class HypCluster(Algorithm, name="hypcluster"):
    """fs.algorithms.hypcluster (Mansour et al. 2020): k models, each client with its best.

    Attributes:
      num_clusters: the models.
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
    """

    num_clusters: int = 2
    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None


@dataclass(frozen=True)
class Ifca(Algorithm, name="ifca"):
    """fs.algorithms.ifca (Ghosh et al. 2020): k models, each client trains its best.

    Attributes:
      num_clusters: the models.
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
    """

    num_clusters: int = 2
    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None


@dataclass(frozen=True)
class FedBuff(Algorithm, name="fedbuff"):
    """fs.algorithms.fedbuff (Nguyen et al. 2022), run asynchronously in virtual time by
    fs.asynchronous on the `[devices]` speeds; `run.rounds` counts aggregations.

    Attributes:
      concurrency: clients training at once (None: `sampler.cohort_size`).
      buffer_size: arrivals per aggregation (None: a tenth of the concurrency).
      staleness: a stale update's weight, 1/sqrt(1 + staleness) or 1.
      batch_size: examples per local step.
      num_epochs: local epochs per round.
      max_steps: a cap on local steps per round (None: none).
      max_examples_per_client: a cap on each client's examples (None: all).
    """

    concurrency: int | None = None
    buffer_size: int | None = None
    staleness: Literal["sqrt", "constant"] = "sqrt"
    batch_size: int = 10
    num_epochs: int = 1
    max_steps: int | None = None
    max_examples_per_client: int | None = None


# --- aggregation -------------------------------------------------------------------------


class Rule(Variant, group="aggregators"):
    """How the clients' updates are combined (`fs.aggregators`, `fs.robust`)."""


@dataclass(frozen=True)
class Mean(Rule, name="mean"):
    """The streamed weighted mean (FedAvg's)."""


@dataclass(frozen=True)
class Median(Rule, name="median"):
    """fs.robust.median: the coordinate-wise median."""


@dataclass(frozen=True)
class TrimmedMean(Rule, name="trimmed_mean"):
    """fs.robust.trimmed_mean: the coordinate-wise mean without each end's share.

    Attributes:
      beta: the share dropped at each end, in [0, 0.5).
    """

    beta: float = 0.1


@dataclass(frozen=True)
class Krum(Rule, name="krum"):
    """fs.robust.krum (Blanchard et al. 2017): the update closest to its neighbours.

    Attributes:
      f: the Byzantine clients tolerated (cohort > 2f + 2).
    """

    f: int = 1


@dataclass(frozen=True)
class MultiKrum(Rule, name="multi_krum"):
    """fs.robust.multi_krum: the mean of Krum's m best.

    Attributes:
      f: the Byzantine clients tolerated.
      m: the clients averaged (None: cohort - f).
    """

    f: int = 1
    m: int | None = None


@dataclass(frozen=True)
class GeometricMedian(Rule, name="geometric_median"):
    """fs.robust.geometric_median (RFA, Pillutla et al. 2022): smoothed Weiszfeld.

    Attributes:
      iters: Weiszfeld iterations.
    """

    iters: int = 3


@dataclass(frozen=True)
class NormBound(Rule, name="norm_bound"):
    """fs.robust.norm_bound then the mean (Sun et al. 2019).

    Attributes:
      max_norm: each update clipped to this L2 norm.
    """

    max_norm: float = 1.0


@dataclass(frozen=True)
class CenteredClipping(Rule, name="centered_clipping"):
    """fs.robust.centered_clipping (Karimireddy et al. 2021) around the last aggregate.

    Attributes:
      tau: the clipping radius.
      iters: clipping iterations.
    """

    tau: float = 1.0
    iters: int = 1


class Compression(Variant, group="compression"):
    """An update compressor (`fs.compression`) between the weighting and the reduction."""


@dataclass(frozen=True)
class NoCompression(Compression, name="none"):
    """Updates sent as float32."""


@dataclass(frozen=True)
class Quantize(Compression, name="quantize"):
    """fs.compression.quantize: stochastic uniform quantization.

    Attributes:
      bits: bits per entry, in [1, 32].
    """

    bits: int = 8


@dataclass(frozen=True)
class Hadamard(Compression, name="hadamard"):
    """fs.compression.hadamard_rotation then quantize.

    Attributes:
      bits: bits per entry, in [1, 32].
      seed: the rotation's seed.
    """

    bits: int = 8
    seed: int = 0


@dataclass(frozen=True)
class Eden(Compression, name="eden"):
    """fs.compression.drive: one bit per entry after a rotation (DRIVE/EDEN).

    Attributes:
      unbiased: EDEN's unbiased scale.
    """

    unbiased: bool = True


@dataclass(frozen=True)
class TopK(Compression, name="topk"):
    """fs.compression.top_k: the largest entries, with error feedback.

    Attributes:
      fraction: the share of entries sent, in (0, 1].
      error_feedback: keep each client's residual in the client store.
      exact: exact selection (False: a sampled threshold, faster on XLA:CPU).
    """

    fraction: float = 0.01
    error_feedback: bool = True
    exact: bool = True


@dataclass(frozen=True)
class Sign(Compression, name="sign"):
    """fs.compression.sign_sgd: signSGD with majority vote (the server step is its lr)."""


class Privacy(Variant, group="privacy"):
    """A privacy mechanism of the chain (`fs.aggregators`, `fs.dp_ftrl`, `fs.secagg`)."""


@dataclass(frozen=True)
class NoPrivacy(Privacy, name="none"):
    """No privacy mechanism."""


@dataclass(frozen=True)
class DpFedAvg(Privacy, name="dp_fedavg"):
    """DP-FedAvg (McMahan et al. 2018): clip, uniform weights, Gaussian noise on the sum over
    the expected cohort; accounted by dp-accounting for the sampler (poisson, uniform or
    cyclic).

    Attributes:
      clip: each update's L2 clip norm.
      noise_multiplier: the noise stddev over the clip (None: calibrated to
        `target_epsilon` for `run.rounds`).
      target_epsilon: the budget; the run stops before passing it (None: no budget).
      delta: the guarantee's delta (None: 1 / N^1.1).
      accountant: "rdp" or "pld".
    """

    clip: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: Literal["rdp", "pld"] = "rdp"


@dataclass(frozen=True)
class AdaptiveDp(Privacy, name="adaptive_dp"):
    """aggregators.adaptive_dp_mean (Andrew et al. 2021): DP-FedAvg clipping at a quantile.

    Attributes:
      noise_multiplier: the noise multiplier (update and count together).
      initial_clip: the first clip norm.
      target_quantile: the quantile of the update norms the clip follows.
      clip_learning_rate: the clip's geometric step.
      count_stddev: the count's noise (None: expected cohort / 20).
      target_epsilon: the budget; the run stops before passing it (None: no budget).
      delta: the guarantee's delta (None: 1 / N^1.1).
      accountant: "rdp" or "pld".
    """

    noise_multiplier: float = 1.0
    initial_clip: float = 0.1
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_stddev: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: Literal["rdp", "pld"] = "rdp"


@dataclass(frozen=True)
class DpFtrl(Privacy, name="dp_ftrl"):
    """fs.dp_ftrl: noise correlated across rounds (tree, banded or BLT matrix
    factorization), under cyclic participation (`sampler.name = "cyclic"`).

    Attributes:
      mechanism: "tree", "banded" or "blt".
      clip: each update's L2 clip norm.
      noise_multiplier: the noise multiplier (None: calibrated to `target_epsilon`).
      target_epsilon: the budget (None: no budget).
      delta: the guarantee's delta (None: 1 / N^1.1).
    """

    mechanism: Literal["tree", "banded", "blt"] = "tree"
    clip: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None


@dataclass(frozen=True)
class LocalDp(Privacy, name="local_dp"):
    """aggregators.local_dp: each client clips and noises its own update.

    Attributes:
      noise_multiplier: the noise stddev over the clip.
      clip: each update's L2 clip norm.
    """

    noise_multiplier: float = 1.0
    clip: float = 1.0


@dataclass(frozen=True)
class SecAgg(Privacy, name="secagg"):
    """fs.secagg.secagg: secure aggregation in a ring (SecAgg+), optionally with distributed
    DP; it is the chain's sum, so it takes the mean rule only.

    Attributes:
      clip: each update's L2 clip norm.
      bits: the ring Z_(2^bits), 2 to 32.
      dropout: each participant's chance of dropping after masking.
      masks: generate the pairwise masks (slow; the sum is the same).
      degree: neighbours per client (None: 2 ceil(log2 cohort)).
      threshold: Shamir's threshold (None: degree // 2 + 1).
      noise: "skellam", "discrete_gaussian" or "none".
      noise_multiplier: the noise over the sensitivity.
      min_clients: the fewest survivors the noise is calibrated for (None: the cohort).
    """

    clip: float = 1.0
    bits: int = 32
    dropout: float = 0.0
    masks: bool = False
    degree: int | None = None
    threshold: int | None = None
    noise: Literal["none", "skellam", "discrete_gaussian"] = "none"
    noise_multiplier: float = 0.0
    min_clients: int | None = None


class UpdateAttack(Variant, group="attacks"):
    """What the malicious clients send (`fs.attacks`)."""


@dataclass(frozen=True)
class NoUpdateAttack(UpdateAttack, name="none"):
    """Honest updates."""


@dataclass(frozen=True)
class SignFlip(UpdateAttack, name="sign_flip"):
    """fs.attacks.sign_flip: minus the honest update.

    Attributes:
      scale: its scale.
    """

    scale: float = 1.0


@dataclass(frozen=True)
class Scaling(UpdateAttack, name="scaling"):
    """fs.attacks.scaling: the update boosted (model replacement).

    Attributes:
      factor: the boost (None: the cohort size over the server learning rate).
    """

    factor: float | None = None


@dataclass(frozen=True)
class Gaussian(UpdateAttack, name="gaussian"):
    """fs.attacks.gaussian: N(0, stddev^2) noise in place of the update.

    Attributes:
      stddev: the noise's standard deviation.
    """

    stddev: float = 1.0


@dataclass(frozen=True)
class Alie(UpdateAttack, name="alie"):
    """fs.attacks.alie (Baruch et al. 2019): "a little is enough" around the rule.

    Attributes:
      z: the shift in standard deviations (None: the paper's z_max for the cohort).
    """

    z: float | None = None


class DataAttack(Variant, group="data_attacks"):
    """How the malicious clients' training data is rewritten (`fs.attacks.poison`)."""


@dataclass(frozen=True)
class NoDataAttack(DataAttack, name="none"):
    """Clean data."""


@dataclass(frozen=True)
class LabelFlip(DataAttack, name="label_flip"):
    """fs.attacks.label_flip: labels l -> num_classes - 1 - l (or source -> target).

    Attributes:
      source: the one class flipped (None: every class).
      target: its new class (with `source`).
    """

    source: int | None = None
    target: int | None = None


@dataclass(frozen=True)
class Backdoor(DataAttack, name="backdoor"):
    """fs.attacks.backdoor: a white square in the corner, relabelled `target`.

    Attributes:
      target: the backdoor's class.
      size: the square's side in pixels.
      value: the square's pixel value.
      fraction: the share of a malicious client's examples triggered.
      image_shape: the images' shape (None: the data set's, before a dense model flattens
        it).
    """

    target: int = 0
    size: int = 4
    value: float = 1.0
    fraction: float = 0.5
    image_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Attack:
    """A seeded set of malicious clients and what they do.

    Attributes:
      update: what they send (`UpdateAttack`).
      data: how their data is poisoned (`DataAttack`).
      malicious_fraction: their share of the population.
      malicious_per_round: malicious clients in each uniform cohort (None: the same share
        of the cohort, rounded); other samplers draw them as they come.
    """

    update: UpdateAttack = NoUpdateAttack()
    data: DataAttack = NoDataAttack()
    malicious_fraction: float = 0.1
    malicious_per_round: int | None = None


@dataclass(frozen=True)
class Aggregation:
    """The aggregation chain: weighting, privacy, compression, the rule, an attack.

    Attributes:
      weighting: "num_examples" or "uniform" (None: the algorithm's default; uniform under
        DP).
      rule: the reduction (`Rule`).
      compression: the update compressor (`Compression`).
      privacy: the privacy mechanism (`Privacy`).
      attack: the adversary (`Attack`).
    """

    weighting: Literal["num_examples", "uniform"] | None = None
    rule: Rule = Mean()
    compression: Compression = NoCompression()
    privacy: Privacy = NoPrivacy()
    attack: Attack = Attack()


# --- sampling and devices ----------------------------------------------------------------


class Sampler(Variant, group="samplers"):
    """How each round's cohort is drawn (`fs.sampling`).

    Attributes:
      cohort_size: the clients per round (Poisson: the expected count).
    """

    cohort_size: int


@dataclass(frozen=True)
class Uniform(Sampler, name="uniform"):
    """fs.sampling.uniform: without replacement, seeded by (seed, round).

    Attributes:
      cohort_size: clients per round.
    """

    cohort_size: int = 100


@dataclass(frozen=True)
class Poisson(Sampler, name="poisson"):
    """fs.sampling.poisson: each client independently (DP-FedAvg's amplification).

    Attributes:
      cohort_size: the expected clients per round.
    """

    cohort_size: int = 100


@dataclass(frozen=True)
class WithReplacement(Sampler, name="with_replacement"):
    """fs.sampling.with_replacement.

    Attributes:
      cohort_size: clients per round.
    """

    cohort_size: int = 100


@dataclass(frozen=True)
class BySize(Sampler, name="by_size"):
    """fs.sampling.by_size: chance proportional to the client's examples.

    Attributes:
      cohort_size: clients per round.
    """

    cohort_size: int = 100


@dataclass(frozen=True)
class OnDevice(Sampler, name="on_device"):
    """fs.sampling.on_device: uniform without replacement, drawn with `jax.random`, so a
    compiled program can draw it (`run.rounds_per_call` > 1 draws this way by itself; this
    runs the same draws round by round).

    Attributes:
      cohort_size: clients per round.
    """

    cohort_size: int = 100


@dataclass(frozen=True)
class Cyclic(Sampler, name="cyclic"):
    """fs.sampling.cyclic: the population in fixed groups, one after another (DP-FTRL's).

    Attributes:
      cohort_size: clients per round.
    """

    cohort_size: int = 100


class Availability(Variant, group="availability"):
    """When each client can be drawn (`fs.devices`)."""


@dataclass(frozen=True)
class Always(Availability, name="always"):
    """Every client always available."""


@dataclass(frozen=True)
class Diurnal(Availability, name="diurnal"):
    """fs.devices.diurnal: each client available `fraction` of every period.

    Attributes:
      period: the day's length in virtual seconds.
      fraction: each client's available share of it.
    """

    period: float = 86400.0
    fraction: float = 0.5


@dataclass(frozen=True)
class FedscaleTrace(Availability, name="fedscale"):
    """fs.devices.fedscale_availability: FedScale's client behaviour trace.

    Attributes:
      path: the trace pickle.
    """

    path: str = ""


class DeviceSpec(Variant, group="devices"):
    """Per-client compute and link speeds and the round's policy (`fs.devices.DeviceModel`),
    which turn the virtual clock on.

    Attributes:
      deadline: seconds a round waits (None: for every client).
      keep_partial: late clients report the local steps that fit.
      over_selection: draw this many times the cohort, count the first to finish.
      dropout: each drawn client's chance of never reporting.
      availability: when clients can be drawn (`Availability`).
    """


@dataclass(frozen=True)
class NoDevices(DeviceSpec, name="none"):
    """No device model: no virtual clock."""


@dataclass(frozen=True)
class _Policy(DeviceSpec):
    """The round's policy, shared by every device profile source.

    Attributes:
      deadline: seconds a round waits (None: for every client).
      keep_partial: late clients report the local steps that fit.
      over_selection: draw this many times the cohort, count the first to finish.
      dropout: each drawn client's chance of never reporting.
      availability: when clients can be drawn (`Availability`).
    """

    deadline: float | None = None
    keep_partial: bool = False
    over_selection: float = 1.0
    dropout: float = 0.0
    availability: Availability = Always()


@dataclass(frozen=True)
class Phones(_Policy, name="phones"):
    """fs.devices.Devices.sample: log-normal phone-class profiles, seeded by the run.

    Attributes:
      example_time: the median seconds per training example.
      download_rate: the median download bytes/s.
      upload_rate: the median upload bytes/s.
      sigma_compute: the compute time's log-spread.
      sigma_network: the links' log-spread.
    """

    example_time: float = 5e-3
    download_rate: float = 2.5e6
    upload_rate: float = 6.25e5
    sigma_compute: float = 0.5
    sigma_network: float = 1.0


@dataclass(frozen=True)
class Lognormal(_Policy, name="lognormal"):
    """fs.asynchronous.lognormal_devices: log-normal compute, fixed links (FedBuff's).

    Attributes:
      example_time: the median seconds per example.
      sigma: the compute time's log-spread.
      download_rate: download bytes/s.
      upload_rate: upload bytes/s.
    """

    example_time: float = 1e-3
    sigma: float = 1.0
    download_rate: float = 1e7
    upload_rate: float = 2.5e6


@dataclass(frozen=True)
class DevicesCsv(_Policy, name="csv"):
    """fs.devices.Devices.from_csv: client,example_time_s,download_Bps,upload_Bps rows.

    Attributes:
      path: the CSV file.
    """

    path: str = ""


@dataclass(frozen=True)
class DevicesFedscale(_Policy, name="fedscale"):
    """fs.devices.Devices.from_fedscale: FedScale's device-capacity pickle.

    Attributes:
      path: the pickle.
    """

    path: str = ""


# --- the run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """The loop.

    Attributes:
      rounds: training rounds (FedBuff: aggregations).
      seed: the seed every random choice derives from.
      data_seed: the seed of the population alone (generated data, splits, the malicious
        clients; None: `seed`), so runs of several seeds can share one population (a
        sweep's runs do).
      chunk_size: clients vectorized side by side (None: an earlier run's choice for the
        same program, else timed on round 1; the run's config.toml records the K used).
      resident: keep the population on the device (None: when it fits).
      client_store: "device", "host" or a directory for per-client state (None: device when
        it fits).
      mesh: split each cohort over all local devices.
      rounds_per_call: run up to this many rounds in one compiled program (a `lax.scan`
        drawing and packing each cohort on the device; calls end at evaluations and
        checkpoints). Needs a resident population, a uniform or on_device sampler and no
        device model.
    """

    rounds: int = 200
    seed: int = 0
    data_seed: int | None = None
    chunk_size: int | None = None
    resident: bool | None = None
    client_store: str | None = None
    mesh: bool = False
    rounds_per_call: int = 1


@dataclass(frozen=True)
class Evaluation:
    """Per-client evaluation during the run.

    Attributes:
      every: evaluate every this many rounds (0: only after the last).
      on: "test" or "train" (the training population itself).
      clients: a seeded sample of this many clients (None: all).
      rolling: a fresh sample at each evaluation.
      batch_size: evaluation batch.
      fine_tune_steps: also evaluate each client after this many local steps on its own
        training split (0: off; personalization algorithms report their own models).
      fine_tune_lr: the fine-tuning SGD step (None: the client optimizer, as configured).
      fine_tune_batch_size: its batch (None: the algorithm's).
    """

    every: int = 20
    on: Literal["test", "train"] = "test"
    clients: int | None = None
    rolling: bool = False
    batch_size: int = 64
    fine_tune_steps: int = 0
    fine_tune_lr: float | None = None
    fine_tune_batch_size: int | None = None


@dataclass(frozen=True)
class Checkpoint:
    """Orbax checkpoints in the run directory.

    Attributes:
      every: a checkpoint every this many rounds (0: at the end and when stopped).
      keep: the newest checkpoints kept.
    """

    every: int = 0
    keep: int = 3


@dataclass(frozen=True)
class Output:
    """Where the run goes.

    Attributes:
      dir: the run directory; one holding an earlier run is kept and this run goes to the
        next free <dir>-N.
      sinks: where the records go in the run directory, of jsonl (history.jsonl and
        clients.jsonl, what `fedjax-sim plot` reads), csv, tensorboard and wandb (`fs.sinks`).
    """

    dir: str = "runs/synthetic"
    sinks: tuple[str, ...] = ("jsonl",)


# The grid fields a sweep can trace besides "client.<option>" and "server.<option>".
SWEEP_FIELDS = ("client_lr", "server_lr", "mu", "clip_norm", "noise_multiplier")


@dataclass(frozen=True)
class Sweep:
    """Many runs of this config as one vmapped program (`fedjax-sim sweep`, `fs.Sweep`).

    Attributes:
      seeds: runs per grid point, seeded run.seed, run.seed + 1, ...
      grid: `{field = [values]}`, every combination run with every seed. Fields: client_lr,
        server_lr, mu (fedprox), clip_norm (a DP clip or norm_bound), noise_multiplier, and
        client.<option> / server.<option> (an optimizer's option, e.g. server.b1).
      devices: split the runs over this many local devices (None: all).
      memory_budget: bytes a device may hold for one group of runs (None: three quarters
        of an accelerator's memory, 4 GiB on a CPU); a larger sweep runs in groups.
    """

    seeds: int = 1
    grid: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    devices: int | None = None
    memory_budget: int | None = None


@dataclass(frozen=True)
class Config:
    """One run: what trains on what, how it aggregates, how it is sampled, evaluated and
    recorded. Every section is documented in its own class.

    Attributes:
      data: the data set (`Dataset`).
      model: the model (`ModelSpec`).
      algorithm: the algorithm and its hyperparameters (`Algorithm`).
      client_optimizer: the clients' local optimizer (`Optimizer`).
      server_optimizer: the server's optimizer on the aggregate (`Optimizer`).
      aggregation: the aggregation chain (`Aggregation`).
      sampler: the cohort sampler (`Sampler`).
      devices: the device model and virtual clock (`DeviceSpec`).
      run: rounds, seed, vectorization (`Run`).
      evaluation: per-client evaluation (`Evaluation`).
      checkpoint: checkpoints (`Checkpoint`).
      output: the run directory (`Output`).
      sweep: seeds and a grid for `fedjax-sim sweep` (`Sweep`).
    """

    data: Dataset = Synthetic()
    model: ModelSpec = LogisticRegression()
    algorithm: Algorithm = FedAvg()
    client_optimizer: Optimizer = Sgd(learning_rate=0.05)
    server_optimizer: Optimizer = Sgd(learning_rate=1.0)
    aggregation: Aggregation = Aggregation()
    sampler: Sampler = Uniform()
    devices: DeviceSpec = NoDevices()
    run: Run = Run()
    evaluation: Evaluation = Evaluation()
    checkpoint: Checkpoint = Checkpoint()
    output: Output = Output()
    sweep: Sweep = Sweep()


# The README's quick start, `fedjax-sim run` with no config: FedAvg on Synthetic(1,1), 1,000
# clients, cohort 100, each test client also fine-tuned 20 steps.
QUICK_START = Config(algorithm=FedAvg(max_examples_per_client=500),
                     evaluation=Evaluation(fine_tune_steps=20))

GROUPS = (Dataset, ModelSpec, Algorithm, Rule, Compression, Privacy, UpdateAttack, DataAttack,
          Sampler, DeviceSpec, Availability, Optimizer, Schedule)


# --- reading -----------------------------------------------------------------------------


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if isinstance(tp, type) and issubclass(tp, Variant):
        return f"a {tp.group[:-1] if tp.group.endswith('s') else tp.group} name or table"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp, key: str) -> Any:
    """`value` (from TOML) as type `tp`, or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        inner = typing.get_args(tp)[1]
        flat = {}  # `--set sweep.grid.server.b1=[...]` nests what TOML writes "server.b1"
        for k, v in value.items():
            nested = v.items() if isinstance(v, Mapping) else [(None, v)]
            flat.update({k if sub is None else f"{k}.{sub}": w for sub, w in nested})
        return {k: _coerce(v, inner, f"{key}.{k}") for k, v in flat.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, Variant):
        return _variant(value, tp, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        return _section(value, tp, key)
    raise TypeError(f"config schema: no reader for {tp!r} ({key})")


def _variant(value: Any, base: type[Variant], key: str) -> Variant:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be {_type_name(base)}, got {value!r}")
    name = value.get("name")
    if name not in base.registry:
        close = difflib.get_close_matches(str(name), base.registry, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        what = "is missing its name" if name is None else f"{name!r} is unknown"
        raise ConfigError(f"{key}: {what}{hint} ({base.group}: {_kinds(base)})")
    return _section({k: v for k, v in value.items() if k != "name"}, base.registry[name], key,
                    kind=name)


def _section(table: Mapping, cls, key: str, kind: str | None = None):
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for name, value in table.items():
        if name not in known:
            raise ConfigError(_unknown(f"{key}.{name}" if key else name, name, known, key,
                                       cls if kind else None))
        values[name] = _coerce(value, hints[name], f"{key}.{name}" if key else name)
    return cls(**values)


def _unknown(full: str, name: str, known: Sequence[str], key: str,
             kind: type[Variant] | None) -> str:
    where = f"{key} ({kind.name})" if kind else (key or "the config")
    options = f"{where} takes: {', '.join(known) if known else 'no options'}"
    if kind is not None:  # another kind of the same section may take it
        others = [n for n, k in kind.registry.items()
                  if name in {f.name for f in dataclasses.fields(k)}]
        if others:
            return (f"config key {full!r} is not an option of {kind.name!r}: it is "
                    f"{', '.join(others)}'s ({options})")
    close = difflib.get_close_matches(name, [*known, *(["name"] if kind else [])], n=1)
    if close:
        hint = f"; did you mean {(key + '.' if key else '') + close[0]!r}?"
    else:  # a key in the wrong section: look everywhere
        close = difflib.get_close_matches(full, schema_keys(), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {full!r}{hint} ({options})"


def schema_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema knows, through every kind of every variant section."""
    keys = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = _hints(cls)[f.name]
        if isinstance(tp, type) and issubclass(tp, Variant):
            keys.append(f"{path}.name")
            for kind in tp.registry.values():
                keys.extend(schema_keys(kind, f"{path}."))
        elif dataclasses.is_dataclass(tp):
            keys.extend(schema_keys(tp, f"{path}."))
        else:
            keys.append(path)
    return sorted(set(keys))


def _merge(base: dict, update: Mapping) -> dict:
    """`update` over `base`, table by table; a variant table naming another kind replaces
    the old kind's options instead of merging with them."""
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        if isinstance(value, str) and isinstance(old, Mapping) and "name" in old:
            value = {"name": value}  # a variant given by name alone
        if isinstance(value, Mapping) and isinstance(old, str):
            old = {"name": old}
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            if "name" in value and "name" in old and value["name"] != old["name"]:
                out[key] = dict(value)
            else:
                out[key] = _merge(old, value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """`key.sub=value` as a nested dict, the value a TOML literal (a bare word is a string).

    Example:
      >>> parse_override("aggregation.rule.f=2")
      {'aggregation': {'rule': {'f': 2}}}
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set takes key=value with a dotted key, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return nested(key, value)


def nested(key: str, value: Any) -> dict:
    """A dotted key's value as nested tables, as `load`'s `updates` take them.

    Example:
      >>> nested("run.seed", 3)
      {'run': {'seed': 3}}
    """
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load(path: str | Path | None = None, *, text: str | None = None,
         overrides: Sequence[str] = (), updates: Sequence[Mapping] = (),
         base: Config | None = None) -> Config:
    """The config of a TOML file (or `text`), then `updates` (nested dicts, in order) and
    `overrides` ("key=value" strings) over it, checked against the schema and for
    options that do not fit together.

    Args:
      path: a TOML file (None: `text`, or no file).
      text: TOML text, in place of a file.
      overrides: "dotted.key=value" strings (`--set`), applied last.
      updates: nested dicts applied before the overrides (the CLI's flags).
      base: the config the file's keys change (default `Config()`'s schema defaults).

    Raises:
      ConfigError: an unknown key (with the closest known one), a value of the wrong type,
        an unknown kind (with the known ones), a missing path, options that do not fit.
    """
    raw: dict = to_dict(Config() if base is None else base)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
    if text is not None:
        try:
            raw = _merge(raw, tomllib.loads(text))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path or 'config'} is not valid TOML: {e}") from None
    combined: dict = {}
    for update in [*updates, *(parse_override(o) for o in overrides)]:
        combined = _merge(combined, update)
    config = _section(_merge(raw, combined), Config, "")
    check(config)
    return config


# --- checks across sections --------------------------------------------------------------

_DP = (DpFedAvg, AdaptiveDp, DpFtrl)


def check(config: Config) -> None:
    """Options that each fit the schema but not each other, and paths that do not exist;
    everything here is refused before any data is read or anything compiles."""
    agg, algo = config.aggregation, config.algorithm
    rule, privacy, attack = agg.rule, agg.privacy, agg.attack
    if isinstance(privacy, SecAgg) and not isinstance(rule, Mean):
        raise ConfigError(f"aggregation.privacy secagg sums the masked updates: it cannot take "
                          f"aggregation.rule {rule.name!r}, which needs each client's update "
                          "(use rule = \"mean\")")
    if isinstance(privacy, _DP) and not isinstance(rule, Mean):
        raise ConfigError(f"aggregation.rule {rule.name!r} replaces the mean that "
                          f"{privacy.name} noises: a robust rule and DP do not combine here "
                          "(use rule = \"mean\")")
    if isinstance(privacy, DpFtrl) and not isinstance(config.sampler, Cyclic):
        raise ConfigError("aggregation.privacy dp_ftrl is accounted for cyclic participation: "
                          f"set sampler.name = \"cyclic\" (got {config.sampler.name!r})")
    if (isinstance(privacy, DpFedAvg | DpFtrl) and privacy.noise_multiplier is None
            and privacy.target_epsilon is None):
        raise ConfigError(f"aggregation.privacy {privacy.name} needs noise_multiplier or "
                          "target_epsilon")
    if isinstance(privacy, SecAgg) and not isinstance(agg.compression, NoCompression):
        raise ConfigError("aggregation.privacy secagg quantizes into its own ring: it takes "
                          f"no aggregation.compression (got {agg.compression.name!r})")
    if isinstance(attack.update, Alie) and isinstance(privacy, SecAgg | LocalDp):
        raise ConfigError(f"aggregation.attack.update alie wraps the rule; "
                          f"aggregation.privacy {privacy.name} hides the updates it needs")
    if not 0 <= attack.malicious_fraction <= 1:
        raise ConfigError(f"aggregation.attack.malicious_fraction must be in [0, 1], got "
                          f"{attack.malicious_fraction:g}")
    grouped = isinstance(algo, HypCluster | Ifca)
    chain_given = (not isinstance(rule, Mean) or not isinstance(privacy, NoPrivacy)
                   or not isinstance(agg.compression, NoCompression) or _attacked(config))
    if grouped and chain_given:
        raise ConfigError(f"algorithm {algo.name} takes no aggregation chain (rule, privacy, "
                          "compression or attack): its k models share one sum")
    if isinstance(algo, FedBuff):
        if isinstance(config.devices, NoDevices):
            raise ConfigError("algorithm fedbuff runs in virtual time: it needs [devices] "
                              "(e.g. devices.name = \"lognormal\")")
        changed = [f.name for f in dataclasses.fields(_Policy)
                   if getattr(config.devices, f.name) != getattr(_Policy(), f.name)]
        if changed:
            raise ConfigError("algorithm fedbuff takes the devices' speeds only: "
                              f"devices.{changed[0]} is a policy of synchronous rounds")
        if _attacked(config) or not isinstance(privacy, NoPrivacy):
            raise ConfigError("algorithm fedbuff takes no aggregation.privacy or "
                              "aggregation.attack (its asynchronous path has neither stage)")
    for name, value in (("client_optimizer.schedule", config.client_optimizer.schedule),
                        ("server_optimizer.schedule", config.server_optimizer.schedule)):
        if isinstance(value, PiecewiseConstant) and len(value.boundaries) != len(value.scales):
            raise ConfigError(f"{name}: boundaries and scales must be as many, got "
                              f"{len(value.boundaries)} and {len(value.scales)}")
    if config.server_optimizer.schedule.over == "rounds":
        raise ConfigError("server_optimizer.schedule.over: the server steps once a round, so "
                          "its schedule is over steps (\"rounds\" is for client optimizers)")
    if config.run.rounds_per_call < 1:
        raise ConfigError(f"run.rounds_per_call must be >= 1, got {config.run.rounds_per_call}")
    if config.run.rounds_per_call > 1:
        if not isinstance(config.sampler, Uniform | OnDevice):
            raise ConfigError("run.rounds_per_call > 1 draws each cohort on the device, "
                              "uniformly: it takes sampler \"uniform\" or \"on_device\", "
                              f"not {config.sampler.name!r}")
        if not isinstance(config.devices, NoDevices) or isinstance(algo, FedBuff):
            raise ConfigError("run.rounds_per_call > 1 cannot run a device model (its plans "
                              "follow the virtual clock on the host)")
        if config.run.resident is False or config.run.client_store not in (None, "device"):
            raise ConfigError("run.rounds_per_call > 1 needs the population and the client "
                              "store on the device (run.resident, run.client_store)")
    for name in config.output.sinks:
        if name not in sinks.SINKS:
            close = difflib.get_close_matches(name, sinks.SINKS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"output.sinks: unknown sink {name!r}{hint}; the sinks are "
                              f"{', '.join(sinks.SINKS)}")
    _check_sweep(config)
    _check_paths(config)


def _check_sweep(config: Config) -> None:
    """The sweep's seeds and field names (whether the built state traces each field is
    `fs.sweep.check_grid`'s check, also before any compile)."""
    sweep = config.sweep
    if sweep.seeds < 1:
        raise ConfigError(f"sweep.seeds must be >= 1, got {sweep.seeds}")
    for name, values in sweep.grid.items():
        side, _, option = name.partition(".")
        spec = {"client": config.client_optimizer, "server": config.server_optimizer}.get(side)
        if spec is not None and option:
            fields = [f.name for f in dataclasses.fields(spec)
                      if _hints(type(spec))[f.name] is float]
            if option not in fields:
                raise ConfigError(f"sweep.grid.{name}: {spec.name!r} has no number option "
                                  f"{option!r} (its options: {', '.join(fields)})")
        elif name not in SWEEP_FIELDS:
            close = difflib.get_close_matches(name, SWEEP_FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"sweep.grid.{name}: not a field a sweep can vary{hint} (the "
                              f"fields: {', '.join(SWEEP_FIELDS)}, client.<option>, "
                              "server.<option>)")
        if not values:
            raise ConfigError(f"sweep.grid.{name} is empty")


def _attacked(config: Config) -> bool:
    attack = config.aggregation.attack
    return not (isinstance(attack.update, NoUpdateAttack)
                and isinstance(attack.data, NoDataAttack))


def _check_paths(config: Config) -> None:
    """Every file the config names must exist (None: the loader's default location)."""
    sections = [("data", config.data), ("model", config.model), ("devices", config.devices)]
    if isinstance(config.devices, _Policy):
        sections.append(("devices.availability", config.devices.availability))
    for section, obj in sections:
        for f in dataclasses.fields(obj):
            if not (f.name == "path" or f.name.endswith(("_path", "params"))):
                continue
            value = getattr(obj, f.name)
            if value is None:
                continue
            if value == "":
                raise ConfigError(f"{section}.{f.name} is required for {section} "
                                  f"{obj.name!r}")
            if not Path(value).exists():
                raise ConfigError(f"{section}.{f.name}: {value!r} does not exist")


# --- writing -----------------------------------------------------------------------------


def to_dict(obj) -> dict:
    """The config (or a section) as TOML-ready nested dicts: a variant's `name` first, None
    left out, tuples as lists."""
    out = {"name": obj.name} if isinstance(obj, Variant) else {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
        out[f.name] = value
    return out


def dumps(config: Config) -> str:
    """The config as TOML text that `load` reads back to an equal config."""
    return tomli_w.dumps(to_dict(config))


def replace(config: Config, **sections) -> Config:
    """`config` with whole sections replaced (`dataclasses.replace`)."""
    return dataclasses.replace(config, **sections)


def describe() -> str:
    """Every registered kind of every group, with its options and defaults (`fedjax-sim
    list`)."""
    lines = []
    for base in GROUPS:
        lines.append(f"{base.group}:")
        for name, kind in base.registry.items():
            doc = (kind.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            lines.append(f"  {name:<22}{' '.join(doc.split())}")
            options = [f"{f.name}={_show(f.default)}" for f in dataclasses.fields(kind)
                       if not dataclasses.is_dataclass(f.default)]
            if options:
                lines.append(f"  {'':<22}options: {', '.join(options)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _show(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(
        value, bool) else str(value)


__all__ = ["Config", "ConfigError", "GROUPS", "QUICK_START", "SWEEP_FIELDS", "Sweep", "Variant",
           "check", "describe", "dumps", "load", "nested", "parse_override", "schema_keys",
           "to_dict", "replace"]
