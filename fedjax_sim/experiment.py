"""A run from its config: the data, the model, the algorithm and the Simulation's arguments a
`fedjax_sim.config.Config` describes (`build`), and the run itself with its run directory
(`run`): config.toml (the resolved config), the sinks' records (history.jsonl and
clients.jsonl by default), summary.json (with the environment, the seed and the chunk size
used), params.msgpack and the checkpoints.

Every kind the schema registers has its builder here, found by the kind's class; building
reads the data and makes the objects but compiles nothing (`build`), so a config can be
checked in full before a run.

Example:
  >>> from fedjax_sim import config, experiment
  >>> cfg = config.load(overrides=["run.rounds=2", "data.num_clients=20",
  ...                              "sampler.cohort_size=5"])
  >>> exp = experiment.build(cfg)            # data, model, algorithm; nothing compiled
  >>> outcome = experiment.run(cfg, progress=False)   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import json
import platform
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np
import optax

from fedjax_sim import (
    aggregators,
    algorithms,
    asynchronous,
    attacks,
    compression,
    data,
    devices,
    dp_ftrl,
    evaluation,
    filters,
    models,
    privacy,
    robust,
    sampling,
    secagg,
)
from fedjax_sim import config as C
from fedjax_sim import sinks as sinks_lib
from fedjax_sim.config import ConfigError
from fedjax_sim.data import storage
from fedjax_sim.simulation import Simulation, SimulationResult

# What a run writes; a directory holding any of them holds an earlier run.
RUN_FILES = ("config.toml", "summary.json", "params.msgpack", "checkpoints", "sweep.json",
             *(f for sink in sinks_lib.SINKS.values() for f in sink.files))


# --- data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """A loaded data set: the populations and what the models need to know of them.

    Attributes:
      train: the training population.
      test: the test population (None: the loader gives none).
      num_classes: the label classes where the loader knows them (None: from the labels).
      vocab_size: the token vocabulary of a sequence data set (None: not one).
    """

    train: data.FederatedData
    test: data.FederatedData | None
    num_classes: int | None = None
    vocab_size: int | None = None


def _split(train, fraction: float, seed: int):
    return (train, None) if fraction == 0 else train.split(fraction, seed=seed)


def _pooled_features(spec: C.Partition, seed: int) -> dict:
    if (spec.path is None) == (spec.pool is None):
        raise ConfigError("data (partition) takes one of path (an .npz of arrays) or pool (a "
                          "data set whose training examples are pooled)")
    if spec.path is not None:
        with np.load(spec.path) as arrays:
            return {k: arrays[k] for k in arrays.files}
    if spec.pool not in C.Dataset.registry or spec.pool == "partition":
        raise ConfigError(f"data.pool: {spec.pool!r} is not a data set "
                          f"({C._kinds(C.Dataset)})")
    kind = C.Dataset.registry[spec.pool]
    options = {} if spec.pool_path is None else {"path": spec.pool_path}
    if options and "path" not in {f.name for f in dataclasses.fields(kind)}:
        raise ConfigError(f"data.pool_path: data set {spec.pool!r} takes no path")
    pooled = load_data(kind(**options), seed).train
    return {k: np.asarray(v) for k, v in pooled.pooled().items()}


def _partition(spec: C.Partition, seed: int) -> Data:
    seed = seed if spec.seed is None else spec.seed
    features = _pooled_features(spec, seed)
    p = data.partition
    if spec.label not in features and spec.scheme in ("dirichlet", "shards"):
        raise ConfigError(f"data.label {spec.label!r} is not a feature "
                          f"({', '.join(features)})")
    train = {
        "iid": lambda: p.iid(features, spec.num_clients, seed=seed),
        "dirichlet": lambda: p.dirichlet(features, spec.num_clients, spec.alpha,
                                         label=spec.label, seed=seed),
        "quantity_skew": lambda: p.quantity_skew(features, spec.num_clients,
                                                 sigma=spec.sigma, seed=seed),
        "shards": lambda: p.shards(features, spec.num_clients, spec.shards_per_client,
                                   label=spec.label, seed=seed),
        "natural": lambda: p.natural(features, spec.id_column),
    }[spec.scheme]()
    num_classes = None
    if spec.pool is not None:
        num_classes = load_hints(C.Dataset.registry[spec.pool]())
    return Data(*_split(train, spec.test_fraction, seed), num_classes=num_classes)


def load_hints(spec: C.Dataset) -> int | None:
    """The label classes a built-in data set has (None: read them from the labels)."""
    if isinstance(spec, C.Synthetic):
        return 10
    if isinstance(spec, C.Femnist | C.EmnistTff | C.EmnistFedjax):
        return 10 if spec.only_digits else 62
    if isinstance(spec, C.Cifar100Tff):
        return 100
    return None


def load_data(spec: C.Dataset, seed: int) -> Data:
    """The populations a `[data]` section names (`seed`: the run's, for seeds left unset)."""
    classes = load_hints(spec)
    if isinstance(spec, C.Synthetic):
        train, test = data.synthetic(
            spec.alpha, spec.beta, num_clients=spec.num_clients, iid=spec.iid,
            test_fraction=spec.test_fraction, num_examples=spec.num_examples,
            max_examples_per_client=spec.max_examples_per_client,
            seed=seed if spec.seed is None else spec.seed)
    elif isinstance(spec, C.Femnist):
        train, test = data.femnist(spec.path, normalize=spec.normalize,
                                   only_digits=spec.only_digits)
    elif isinstance(spec, C.Shakespeare):
        train, test = data.shakespeare(spec.path, sequence_length=spec.sequence_length,
                                       test_fraction=spec.test_fraction,
                                       seed=seed if spec.seed is None else spec.seed)
        return Data(train, test, vocab_size=models.CHAR_VOCAB_SIZE)
    elif isinstance(spec, C.Leaf):
        shapes = None if spec.x_shape is None else {"x": spec.x_shape}
        train = data.load_leaf(spec.path, shapes=shapes)
        if spec.test_path is not None:
            test = data.load_leaf(spec.test_path, shapes=shapes)
        else:
            train, test = _split(train, spec.test_fraction, seed)
    elif isinstance(spec, C.TffSqlite):
        load = lambda split: data.load_tff_sqlite(spec.path, split, features=spec.features)
        train, test = load(spec.train_split), load(spec.test_split) if spec.test_split else None
    elif isinstance(spec, C.FedjaxSqlite):
        train = data.load_fedjax_sqlite(spec.path)
        if spec.test_path is not None:
            test = data.load_fedjax_sqlite(spec.test_path)
        else:
            train, test = _split(train, spec.test_fraction, seed)
    elif isinstance(spec, C.Npy | C.StoreSqlite):
        load = storage.load_npy if isinstance(spec, C.Npy) else storage.load_sqlite
        train = load(spec.path)
        test = None if spec.test_path is None else load(spec.test_path)
    elif isinstance(spec, C.EmnistTff):
        train, test = data.emnist_tff(spec.path, only_digits=spec.only_digits,
                                      normalize=spec.normalize)
    elif isinstance(spec, C.EmnistFedjax):
        train, test = data.emnist_fedjax(spec.train_path, spec.test_path,
                                         only_digits=spec.only_digits, normalize=spec.normalize)
    elif isinstance(spec, C.Cifar100Tff):
        train, test = data.cifar100_tff(spec.path, normalize=spec.normalize)
    elif isinstance(spec, C.ShakespeareTff):
        train, test = data.shakespeare_tff(spec.path, sequence_length=spec.sequence_length)
        return Data(train, test, vocab_size=models.CHAR_VOCAB_SIZE)
    elif isinstance(spec, C.StackoverflowTff):
        train, _, test, _ = data.stackoverflow_tff(spec.path, vocab_size=spec.vocab_size,
                                                   max_length=spec.max_length,
                                                   num_oov_buckets=spec.num_oov_buckets)
        return Data(train, test, vocab_size=spec.vocab_size)
    elif isinstance(spec, C.Partition):
        return _partition(spec, seed)
    else:
        raise TypeError(f"no loader for data {spec.name!r}")
    return Data(train, test, num_classes=classes)


# --- models and optimizers ---------------------------------------------------------------

_DENSE = (C.LogisticRegression, C.Mlp)


def _num_classes(spec, loaded: Data) -> int:
    if spec.num_classes is not None:
        return spec.num_classes
    if loaded.num_classes is not None:
        return loaded.num_classes
    if "y" not in loaded.train.features:
        raise ConfigError(f"model {spec.name}: set model.num_classes (the data has no 'y')")
    return int(np.max(loaded.train.features["y"])) + 1


def flatten(loaded: Data) -> Data:
    """Each example's "x" as one flat vector, for the dense models."""
    x = loaded.train.features.get("x")
    if x is None or np.ndim(x) <= 2:
        return loaded
    flat = lambda f: {**f, "x": f["x"].reshape(len(f["x"]), -1)}
    return dataclasses.replace(loaded, train=loaded.train.map(flat),
                               test=None if loaded.test is None else loaded.test.map(flat))


def build_model(spec: C.ModelSpec, loaded: Data) -> models.Model:
    """The zoo model a `[model]` section names, sized by the data where it leaves a size
    unset (`loaded` already flattened for the dense models)."""
    if isinstance(spec, _DENSE):
        x = loaded.train.features.get("x")
        if x is None:
            raise ConfigError(f"model {spec.name} reads feature 'x', which the data lacks")
        num_features = int(np.prod(np.shape(x)[1:]))
        if isinstance(spec, C.LogisticRegression):
            return models.logistic_regression(num_features, _num_classes(spec, loaded))
        return models.mlp(num_features, _num_classes(spec, loaded), hidden=spec.hidden)
    if isinstance(spec, C.EmnistCnn):
        return models.emnist_cnn(_num_classes(spec, loaded))
    if isinstance(spec, C.Resnet18Gn):
        return models.resnet18_gn(_num_classes(spec, loaded), spec.groups, width=spec.width)
    if isinstance(spec, C.CharLstm):
        return models.char_lstm(spec.vocab_size, spec.embed_dim, spec.hidden, spec.num_layers)
    if isinstance(spec, C.WordLstm):
        vocab = spec.vocab_size or loaded.vocab_size or 10000
        return models.word_lstm(vocab, spec.embed_dim, spec.hidden, spec.projection,
                                spec.num_oov_buckets)
    if isinstance(spec, C.CausalTransformer):
        max_len = spec.max_len or int(np.shape(loaded.train.features["x"])[1])
        return models.causal_transformer(spec.vocab_size, max_len=max_len,
                                         d_model=spec.d_model, num_heads=spec.num_heads,
                                         num_layers=spec.num_layers, mlp_dim=spec.mlp_dim,
                                         lora_rank=spec.lora_rank, lora_alpha=spec.lora_alpha)
    raise TypeError(f"no builder for model {spec.name!r}")


def initial_params(spec: C.ModelSpec, model: models.Model, seed: int):
    """The params a run starts from: a params.msgpack, a base loaded into a fresh init, or
    None (the Simulation initializes from the seed)."""
    if spec.params is None and spec.base_params is None:
        return None
    fresh = model.init(jax.random.key(seed))
    if spec.params is not None:
        return flax.serialization.from_bytes(fresh, Path(spec.params).read_bytes())
    base = flax.serialization.msgpack_restore(Path(spec.base_params).read_bytes())
    return filters.with_base(fresh, base)


def schedule(spec: C.Schedule, lr: float):
    """The learning rate `spec` makes of `lr` (a float for a constant)."""
    if isinstance(spec, C.Constant):
        return lr
    if isinstance(spec, C.CosineDecay):
        return optax.cosine_decay_schedule(lr, spec.decay_steps, spec.alpha)
    if isinstance(spec, C.ExponentialDecay):
        return optax.exponential_decay(lr, spec.transition_steps, spec.decay_rate,
                                       staircase=spec.staircase)
    if isinstance(spec, C.Linear):
        return optax.linear_schedule(lr, spec.end_value, spec.transition_steps)
    if isinstance(spec, C.WarmupCosineDecay):
        return optax.warmup_cosine_decay_schedule(spec.init_value, lr, spec.warmup_steps,
                                                  spec.decay_steps, spec.end_value)
    if isinstance(spec, C.PiecewiseConstant):
        return optax.piecewise_constant_schedule(
            lr, dict(zip(spec.boundaries, spec.scales, strict=True)))
    raise TypeError(f"no builder for schedule {spec.name!r}")


def _transformation(spec: C.Optimizer, lr) -> optax.GradientTransformation:
    if isinstance(spec, C.Sgd):
        return optax.sgd(lr, momentum=spec.momentum, nesterov=spec.nesterov)
    if isinstance(spec, C.Adam):
        return optax.adam(lr, b1=spec.b1, b2=spec.b2, eps=spec.eps)
    if isinstance(spec, C.Adagrad):
        return optax.adagrad(lr, initial_accumulator_value=spec.initial_accumulator_value,
                             eps=spec.eps)
    if isinstance(spec, C.Rmsprop):
        return optax.rmsprop(lr, decay=spec.decay, eps=spec.eps, momentum=spec.momentum)
    if isinstance(spec, C.Yogi):
        return optax.yogi(lr, b1=spec.b1, b2=spec.b2, eps=spec.eps)
    if isinstance(spec, C.FedAvgM):
        return algorithms.fedavgm(lr, spec.momentum)
    if isinstance(spec, C.FedAdam):
        return algorithms.fedadam(lr, spec.b1, spec.b2, spec.tau)
    if isinstance(spec, C.FedYogi):
        return algorithms.fedyogi(lr, spec.b1, spec.b2, spec.tau)
    if isinstance(spec, C.FedAdagrad):
        return algorithms.fedadagrad(lr, spec.b1, spec.tau)
    raise TypeError(f"no builder for optimizer {spec.name!r}")


def build_optimizer(spec: C.Optimizer, *, per_round: bool = True, traced: Sequence[str] = ()):
    """The optax optimizer of an `[*_optimizer]` section; a client schedule over rounds is a
    function of the round (the algorithms' per-round client optimizers), or with
    `per_round=False` the plain optimizer at the initial learning rate. `traced` options
    (a sweep's grid) are injected hyperparameters in the optimizer state, so one compiled
    program runs every value."""
    if traced:
        if not isinstance(spec.schedule, C.Constant):
            raise ConfigError(f"a sweep over {spec.name}'s {', '.join(traced)} needs a "
                              f"constant schedule, not {spec.schedule.name!r}")

        def factory(**values):
            lr = values.pop("learning_rate", spec.learning_rate)
            return _transformation(dataclasses.replace(spec, **values), lr)

        # inject_hyperparams reads the factory's parameters by name from its signature.
        factory.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in traced])
        return optax.inject_hyperparams(factory)(**{n: getattr(spec, n) for n in traced})
    if spec.schedule.over == "rounds":
        if not per_round:
            return _transformation(spec, spec.learning_rate)
        lr = schedule(spec.schedule, spec.learning_rate)
        return lambda round_num: _transformation(spec, lr(round_num))
    return _transformation(spec, schedule(spec.schedule, spec.learning_rate))


def _traced(cfg: C.Config, side: str) -> list[str]:
    """The options of the `side` optimizer that the sweep's grid varies."""
    out = []
    for name in cfg.sweep.grid:
        if name == f"{side}_lr":
            out.append("learning_rate")
        elif name.startswith(f"{side}."):
            out.append(name.split(".", 1)[1])
    return out


def _sgd_lr(cfg: C.Config) -> float:
    """The client learning rate of the algorithms whose clients step plain SGD."""
    opt = cfg.client_optimizer
    if not isinstance(opt, C.Sgd) or opt.momentum or not isinstance(opt.schedule, C.Constant):
        raise ConfigError(f"algorithm {cfg.algorithm.name} steps plain SGD at "
                          "client_optimizer.learning_rate: set client_optimizer.name = \"sgd\" "
                          "without momentum or a schedule")
    return opt.learning_rate


def build_algorithm(cfg: C.Config, model: models.Model, aggregator):
    """The algorithm the `[algorithm]` section names, with the configured optimizers and
    the aggregation chain (None: the algorithm's own default for the weighting)."""
    spec = cfg.algorithm
    weighting = cfg.aggregation.weighting
    client = lambda: build_optimizer(cfg.client_optimizer, traced=_traced(cfg, "client"))
    server = build_optimizer(cfg.server_optimizer, traced=_traced(cfg, "server"))
    local = dict(batch_size=spec.batch_size, num_epochs=spec.num_epochs,
                 max_steps=spec.max_steps)
    chain = dict(aggregator=aggregator,
                 **({} if weighting is None else {"client_weighting": weighting}))
    if isinstance(spec, C.FedAvg):
        example_dp = (None if spec.example_dp_clip is None else
                      algorithms.ExampleDP(spec.example_dp_clip, spec.example_dp_noise))
        return algorithms.fedavg(
            model, client(), server, **local, **chain, drop_remainder=spec.drop_remainder,
            max_examples_per_client=spec.max_examples_per_client, shuffle=spec.shuffle,
            mu=spec.mu, straggler_fraction=spec.straggler_fraction,
            drop_stragglers=spec.drop_stragglers, trainable=spec.trainable,
            example_dp=example_dp)
    if isinstance(spec, C.FedSgd):
        return algorithms.fedsgd(model, server, **chain)
    if isinstance(spec, C.FedProx):
        return algorithms.fedprox(model, client(), server, mu=spec.mu, **local, **chain,
                                  max_examples_per_client=spec.max_examples_per_client,
                                  straggler_fraction=spec.straggler_fraction,
                                  drop_stragglers=spec.drop_stragglers)
    capped = dict(**local, max_examples_per_client=getattr(spec, "max_examples_per_client",
                                                            None))
    if isinstance(spec, C.Scaffold):
        return algorithms.scaffold(model, _sgd_lr(cfg), server, **capped, **chain)
    if isinstance(spec, C.FedNova):
        return algorithms.fednova(model, _sgd_lr(cfg), server, momentum=spec.momentum,
                                  **capped, **chain)
    if isinstance(spec, C.QFfl):
        if aggregator is not None:
            raise ConfigError("algorithm qffl takes no aggregation chain (its server step "
                              "combines the clients' q-weighted updates itself)")
        return algorithms.qffl(model, _sgd_lr(cfg), spec.q, **capped)
    if isinstance(spec, C.FedDyn):
        return algorithms.feddyn(model, client(), spec.alpha, server, **capped, **chain)
    if isinstance(spec, C.Mime | C.MimeLite):
        make = algorithms.mime if isinstance(spec, C.Mime) else algorithms.mimelite
        return make(model, build_optimizer(cfg.client_optimizer, per_round=False), **capped,
                    **chain)
    if isinstance(spec, C.AgnosticFedAvg):
        if aggregator is not None:
            raise ConfigError("algorithm agnostic_fedavg takes no aggregation chain")
        return algorithms.agnostic_fedavg(model, client(), spec.num_domains, server,
                                          domain=spec.domain, domain_lr=spec.domain_lr,
                                          **local)
    if isinstance(spec, C.Ditto):
        return algorithms.ditto(model, client(), server, lam=spec.lam, **local, **chain)
    if isinstance(spec, C.Apfl):
        lr = cfg.client_optimizer.learning_rate if spec.alpha_lr is None else spec.alpha_lr
        return algorithms.apfl(model, client(), server, alpha=spec.alpha,
                               adaptive_alpha=spec.adaptive_alpha, alpha_lr=lr, **local,
                               **chain)
    if isinstance(spec, C.PFedMe):
        lr = _sgd_lr(cfg)
        return algorithms.pfedme(model, lam=spec.lam, inner_steps=spec.inner_steps,
                                 personal_lr=lr if spec.personal_lr is None else
                                 spec.personal_lr, eta=lr if spec.eta is None else spec.eta,
                                 server_optimizer=server, **local, **chain)
    if isinstance(spec, C.FedRep):
        return algorithms.fedrep(model, client(), server, head=spec.head,
                                 head_steps=spec.head_steps, **local, **chain)
    if isinstance(spec, C.FedPer):
        return algorithms.fedper(model, client(), server, head=spec.head, **local, **chain)
    if isinstance(spec, C.HypCluster | C.Ifca):
        make = algorithms.hypcluster if isinstance(spec, C.HypCluster) else algorithms.ifca
        return make(model, client(), spec.num_clusters, server, **local)
    if isinstance(spec, C.FedBuff):
        m = _concurrency(cfg)
        return algorithms.fedbuff(
            model, client(), server, buffer_size=spec.buffer_size or max(1, m // 10),
            staleness=spec.staleness, **capped, client_weighting=weighting or "num_examples")
    raise TypeError(f"no builder for algorithm {spec.name!r}")


def _concurrency(cfg: C.Config) -> int:
    return cfg.algorithm.concurrency or cfg.sampler.cohort_size


# --- the aggregation chain and the sampler -----------------------------------------------


def compression_stages(spec: C.Compression) -> list:
    """The compressor's chain stages, between the weighting and the reduction."""
    if isinstance(spec, C.NoCompression):
        return []
    if isinstance(spec, C.Quantize):
        return [compression.quantize(spec.bits)]
    if isinstance(spec, C.Hadamard):
        return [compression.hadamard_rotation(spec.seed), compression.quantize(spec.bits)]
    if isinstance(spec, C.Eden):
        return [compression.drive(spec.unbiased)]
    if isinstance(spec, C.TopK):
        return [compression.top_k(spec.fraction, error_feedback=spec.error_feedback,
                                  exact=spec.exact)]
    if isinstance(spec, C.Sign):
        return [compression.sign_sgd()]
    raise TypeError(f"no builder for compression {spec.name!r}")


def rule_stages(spec: C.Rule, weighting, stages: list) -> list:
    """The robust rule's stages around the weighting and the compression `stages`."""
    if isinstance(spec, C.NormBound):
        return [robust.norm_bound(spec.max_norm), weighting, *stages, aggregators.mean()]
    reduction = {
        C.Mean: lambda: aggregators.mean(),
        C.Median: lambda: robust.median(),
        C.TrimmedMean: lambda: robust.trimmed_mean(spec.beta),
        C.Krum: lambda: robust.krum(spec.f),
        C.MultiKrum: lambda: robust.multi_krum(spec.f, spec.m),
        C.GeometricMedian: lambda: robust.geometric_median(spec.iters),
        C.CenteredClipping: lambda: robust.centered_clipping(spec.tau, spec.iters),
    }[type(spec)]()
    return [weighting, *stages, reduction]


@dataclass(frozen=True)
class Chain:
    """What the `[aggregation]` and `[sampler]` sections make.

    Attributes:
      aggregator: the chain (None: the algorithm's default mean).
      sampling: the Simulation's sampler arguments (`cohort_size` or `sampler`).
      train: the training population (the attack's poisoned copy).
      eval_extra: extra evaluation sets (the attack's success set).
      noise_multiplier: DP's noise multiplier (None: no central DP).
      adversary: the malicious clients (None: no attack).
      malicious_per_round: malicious clients in each uniform cohort.
    """

    aggregator: Any
    sampling: dict
    train: data.FederatedData
    eval_extra: dict | None = None
    noise_multiplier: float | None = None
    adversary: attacks.Adversary | None = None
    malicious_per_round: int | None = None


def build_sampler(cfg: C.Config, train) -> sampling.Sampler | None:
    """The `[sampler]` section's sampler (None for uniform: the Simulation's own)."""
    spec, n, m = cfg.sampler, train.num_clients, cfg.sampler.cohort_size
    if m > n:
        raise ConfigError(f"sampler.cohort_size {m} is larger than the population of {n} "
                          "clients")
    if isinstance(spec, C.Uniform):
        return None
    if isinstance(spec, C.Poisson):
        return sampling.poisson(n, m)
    if isinstance(spec, C.WithReplacement):
        return sampling.with_replacement(n, m)
    if isinstance(spec, C.BySize):
        return sampling.by_size(train.num_examples, m)
    if isinstance(spec, C.Cyclic):
        return sampling.cyclic(n, m)
    if isinstance(spec, C.OnDevice):
        return sampling.on_device(n, m)
    raise TypeError(f"no builder for sampler {spec.name!r}")


def _delta(spec, num_clients: int) -> float:
    return privacy.default_delta(num_clients) if spec.delta is None else spec.delta


def _privacy_stages(cfg: C.Config, sampler, n: int, stages: list):
    """(stages, noise multiplier) of the privacy mechanism; stages None without one."""
    spec, agg = cfg.aggregation.privacy, cfg.aggregation
    m, rounds = cfg.sampler.cohort_size, cfg.run.rounds
    uniform = aggregators.weight_by(agg.weighting or "uniform")
    if isinstance(spec, C.DpFedAvg):
        z = spec.noise_multiplier
        if z is None:
            if not isinstance(cfg.sampler, C.Poisson):
                raise ConfigError("aggregation.privacy.target_epsilon calibrates the noise for "
                                  "sampler poisson; give noise_multiplier for sampler "
                                  f"{cfg.sampler.name!r}")
            z = privacy.noise_multiplier_for(spec.target_epsilon, m / n, rounds,
                                             _delta(spec, n), accountant=spec.accountant)
        return [aggregators.clip(spec.clip), uniform, *stages,
                aggregators.dp_mean(z, spec.clip, m)], z
    if isinstance(spec, C.AdaptiveDp):
        return [uniform, *stages, aggregators.adaptive_dp_mean(
            spec.noise_multiplier, m, initial_clip=spec.initial_clip,
            target_quantile=spec.target_quantile, clip_learning_rate=spec.clip_learning_rate,
            count_stddev=spec.count_stddev)], spec.noise_multiplier
    if isinstance(spec, C.DpFtrl):
        participation = sampler.participation
        mech = dp_ftrl.mechanism(spec.mechanism, rounds, dp_ftrl.separation(participation))
        z = spec.noise_multiplier
        if z is None:
            z = dp_ftrl.noise_multiplier_for(mech, spec.target_epsilon, participation, rounds,
                                             _delta(spec, n))
        return [aggregators.clip(spec.clip), uniform, *stages,
                dp_ftrl.dp_ftrl_mean(z, spec.clip, m, mech)], z
    if isinstance(spec, C.SecAgg):
        noise = None if spec.noise == "none" else spec.noise
        size = m if sampler is None else sampler.max_size
        return [uniform, *stages, secagg.secagg(
            spec.clip, size, bits=spec.bits, degree=spec.degree, threshold=spec.threshold,
            dropout=spec.dropout, masks=spec.masks, noise=noise,
            noise_multiplier=spec.noise_multiplier, min_clients=spec.min_clients,
            expected_weight=float(m) if noise else None)], None
    return None, None


def build_chain(cfg: C.Config, loaded: Data, test, image_shape=None) -> Chain:
    """The aggregation chain, the sampler and the attack's data of a config (`test`: the
    evaluated population, for the attack's success set; `image_shape`: the images' shape
    before flattening, for a backdoor)."""
    train = loaded.train
    agg, n = cfg.aggregation, train.num_clients
    sampler = build_sampler(cfg, train)
    stages = compression_stages(agg.compression)
    private, z = _privacy_stages(cfg, sampler, n, stages)
    if private is not None:
        chain = private
    else:
        weighting = aggregators.weight_by(agg.weighting or "num_examples")
        plain = isinstance(agg.rule, C.Mean) and not stages
        chain = None if plain else rule_stages(agg.rule, weighting, stages)
        if isinstance(agg.privacy, C.LocalDp):
            local = aggregators.local_dp(agg.privacy.noise_multiplier, agg.privacy.clip)
            chain = [local, *(chain or rule_stages(agg.rule, weighting, stages))]
    attack = agg.attack
    sampling_kw = ({"cohort_size": cfg.sampler.cohort_size} if sampler is None
                   else {"sampler": sampler})
    if not C._attacked(cfg):
        return Chain(None if chain is None else aggregators.chain(*chain), sampling_kw, train,
                     noise_multiplier=z)
    adversary = attacks.Adversary.choose(n, attack.malicious_fraction,
                                         seed=population_seed(cfg))
    per_round = attack.malicious_per_round
    if sampler is None:  # uniform: the same share of malicious clients in every cohort
        per_round = (round(attack.malicious_fraction * cfg.sampler.cohort_size)
                     if per_round is None else per_round)
        sampling_kw = {"sampler": adversary.sampler(cfg.sampler.cohort_size, per_round)}
    elif per_round is not None:
        raise ConfigError("aggregation.attack.malicious_per_round fixes each uniform cohort's "
                          f"malicious count; sampler {cfg.sampler.name!r} draws them as it "
                          "draws everyone")
    chain = list(chain or (aggregators.weight_by(agg.weighting or "num_examples"),
                           aggregators.mean()))
    update = attack.update
    first = []
    if isinstance(update, C.SignFlip):
        first = [attacks.sign_flip(adversary, update.scale)]
    elif isinstance(update, C.Scaling):
        factor = (cfg.sampler.cohort_size / cfg.server_optimizer.learning_rate
                  if update.factor is None else update.factor)
        first = [attacks.scaling(adversary, factor)]
    elif isinstance(update, C.Gaussian):
        first = [attacks.gaussian(adversary, update.stddev)]
    elif isinstance(update, C.Alie):
        chain[-1] = attacks.alie(adversary, chain[-1], z=update.z)
    if first:
        first.append(aggregators.mask_nonfinite())
    poisoned, extra = train, None
    poison = _data_attack(attack.data, loaded, image_shape)
    if poison is not None:
        poisoned = attacks.poison(train, adversary, poison, seed=population_seed(cfg))
        extra = {"attack_success": poison.success_data(test)} if test is not None else None
    return Chain(aggregators.chain(*first, *chain), sampling_kw, poisoned, extra, z, adversary,
                 per_round)


def _data_attack(spec: C.DataAttack, loaded: Data, image_shape):
    if isinstance(spec, C.NoDataAttack):
        return None
    num_classes = loaded.num_classes or int(np.max(loaded.train.features["y"])) + 1
    if isinstance(spec, C.LabelFlip):
        return attacks.label_flip(num_classes, source=spec.source, target=spec.target)
    if isinstance(spec, C.Backdoor):
        shape = spec.image_shape or image_shape or tuple(np.shape(loaded.train.features["x"])[1:])
        return attacks.backdoor(spec.target, num_classes, image_shape=tuple(shape),
                                size=spec.size, value=spec.value, fraction=spec.fraction)
    raise TypeError(f"no builder for data attack {spec.name!r}")


# --- devices -----------------------------------------------------------------------------


def build_profiles(spec: C.DeviceSpec, num_clients: int, seed: int) -> devices.Devices | None:
    """The per-client speeds of a `[devices]` section (None: no device model)."""
    if isinstance(spec, C.NoDevices):
        return None
    if isinstance(spec, C.Phones):
        return devices.Devices.sample(num_clients, seed, example_time=spec.example_time,
                                      download_rate=spec.download_rate,
                                      upload_rate=spec.upload_rate,
                                      sigma_compute=spec.sigma_compute,
                                      sigma_network=spec.sigma_network)
    if isinstance(spec, C.Lognormal):
        return asynchronous.lognormal_devices(num_clients, seed=seed,
                                              example_time=spec.example_time,
                                              sigma=spec.sigma,
                                              download_rate=spec.download_rate,
                                              upload_rate=spec.upload_rate)
    if isinstance(spec, C.DevicesCsv):
        return devices.Devices.from_csv(spec.path)
    if isinstance(spec, C.DevicesFedscale):
        return devices.Devices.from_fedscale(spec.path, num_clients, seed)
    raise TypeError(f"no builder for devices {spec.name!r}")


def build_device_model(spec: C.DeviceSpec, num_clients: int,
                       seed: int) -> devices.DeviceModel | None:
    """The device model (speeds, deadline, over-selection, dropout, availability)."""
    profiles = build_profiles(spec, num_clients, seed)
    if profiles is None:
        return None
    avail = spec.availability
    availability = (None if isinstance(avail, C.Always) else
                    devices.diurnal(num_clients, seed, period=avail.period,
                                    fraction=avail.fraction) if isinstance(avail, C.Diurnal)
                    else devices.fedscale_availability(avail.path, num_clients, seed))
    return devices.DeviceModel(profiles, deadline=spec.deadline,
                               over_selection=spec.over_selection, dropout=spec.dropout,
                               availability=availability, keep_partial=spec.keep_partial)


# --- the experiment ----------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    """Everything a config builds, before anything compiles.

    Attributes:
      config: the config.
      data: the loaded data (flattened for a dense model).
      train: the training population (the attack's poisoned copy where there is one).
      eval_data: the population evaluated (None: no evaluation).
      model: the model.
      algorithm: the algorithm (a `BufferedAlgorithm` for fedbuff).
      chain: the aggregation chain, sampler and attack (`Chain`).
      simulation: the keyword arguments of `fs.Simulation` beside algorithm and train
        (output_dir, resume and progress are the runner's).
    """

    config: C.Config
    data: Data
    train: data.FederatedData
    eval_data: data.FederatedData | None
    model: models.Model
    algorithm: Any
    chain: Chain
    simulation: dict


def _eval_data(cfg: C.Config, loaded: Data):
    if cfg.evaluation.on == "train":
        return loaded.train
    if loaded.test is None:
        raise ConfigError(f"data {cfg.data.name!r} gives no test split here: set its "
                          "test_fraction (or test_path), or evaluation.on = \"train\"")
    return loaded.test


def population_seed(cfg: C.Config) -> int:
    """The seed of what a run trains on (generated data, splits, the malicious clients):
    `run.data_seed`, else the run's seed."""
    return cfg.run.seed if cfg.run.data_seed is None else cfg.run.data_seed


def build(cfg: C.Config) -> Experiment:
    """The data, model, algorithm and Simulation arguments of `cfg`; reads the data, builds
    the objects and compiles nothing.

    Raises:
      ConfigError: options that fit the schema but not the data (a cohort larger than the
        population, a model that does not fit, ...).
    """
    seed = cfg.run.seed
    loaded = load_data(cfg.data, population_seed(cfg))
    x = loaded.train.features.get("x")
    image_shape = None if x is None else tuple(np.shape(x)[1:])
    if isinstance(cfg.model, _DENSE):
        loaded = flatten(loaded)
    model = build_model(cfg.model, loaded)
    eval_data = _eval_data(cfg, loaded)
    if isinstance(cfg.algorithm, C.FedBuff):
        if _concurrency(cfg) > loaded.train.num_clients:
            raise ConfigError(f"algorithm.concurrency {_concurrency(cfg)} is larger than the "
                              f"population of {loaded.train.num_clients} clients")
        algo = build_algorithm(cfg, model, None)
        chain = Chain(None, {}, loaded.train)
        return Experiment(cfg, loaded, loaded.train, eval_data, model, algo, chain, {})
    chain = build_chain(cfg, loaded, eval_data, image_shape)
    algo = build_algorithm(cfg, model, chain.aggregator)
    ev = cfg.evaluation
    tune = None
    if ev.fine_tune_steps and algo.personal is None:
        opt = (optax.sgd(ev.fine_tune_lr) if ev.fine_tune_lr is not None
               else build_optimizer(cfg.client_optimizer, per_round=False))
        tune = evaluation.FineTune(opt, ev.fine_tune_steps,
                                   ev.fine_tune_batch_size or cfg.algorithm.batch_size)
    if isinstance(cfg.aggregation.privacy, C.DpFedAvg | C.AdaptiveDp | C.DpFtrl):
        spec = cfg.aggregation.privacy
        dp = dict(delta=spec.delta, target_epsilon=spec.target_epsilon)
        if getattr(spec, "accountant", None) is not None:
            dp["accountant"] = spec.accountant
    else:
        dp = {}
    run = cfg.run
    simulation = dict(
        **chain.sampling, **dp, seed=seed, eval_data=eval_data, eval_every=ev.every,
        eval_clients=ev.clients, eval_batch_size=ev.batch_size, eval_rolling=ev.rolling,
        fine_tune=tune, eval_extra=chain.eval_extra, chunk_size=run.chunk_size,
        mesh=_mesh(run), resident=run.resident, client_store=run.client_store,
        rounds_per_call=run.rounds_per_call, checkpoint_every=cfg.checkpoint.every,
        keep_checkpoints=cfg.checkpoint.keep,
        devices=build_device_model(cfg.devices, chain.train.num_clients, seed),
        params=initial_params(cfg.model, model, seed))
    return Experiment(cfg, loaded, chain.train, eval_data, model, algo, chain, simulation)


def _mesh(run: C.Run):
    from fedjax_sim.engine import client_mesh

    return client_mesh() if run.mesh else None


# --- the run and its directory -----------------------------------------------------------


def fresh_output_dir(path: str | Path, overwrite: bool,
                     announce: Callable[[str], Any] = print) -> Path:
    """`path`, or the first free `path-2`, `path-3`, ... when `path` holds an earlier run
    (`overwrite`: its run files removed and `path` reused)."""
    path = Path(path)
    if not path.name:  # "." or "": a sibling needs a name
        path = path.resolve()
    if overwrite and path.is_dir():
        for name in RUN_FILES:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    if overwrite or not any((path / name).exists() for name in RUN_FILES):
        return path
    n = 2
    while any((path.with_name(f"{path.name}-{n}") / name).exists() for name in RUN_FILES):
        n += 1
    fresh = path.with_name(f"{path.name}-{n}")
    announce(f"{path} holds an earlier run (kept); this run goes to {fresh} (--overwrite "
             "replaces it instead)")
    return fresh


def environment() -> dict:
    """The package, JAX and Python versions, the platform and the devices a run used."""
    version = lambda name: importlib.metadata.version(name)
    return {"fedjax_sim": version("fedjax_sim"), "jax": jax.__version__,
            "jaxlib": version("jaxlib"), "python": sys.version.split()[0],
            "platform": platform.platform(),
            "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()]}


def write_config(cfg: C.Config, output_dir: Path) -> None:
    """RUN_DIR/config.toml: the resolved config, its output dir the run's own."""
    cfg = C.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(output_dir)))
    (output_dir / "config.toml").write_text(
        "# The resolved config of this run: `fedjax-sim run config.toml` reruns it.\n"
        + C.dumps(cfg))


@dataclass(frozen=True)
class Outcome:
    """A finished run.

    Attributes:
      experiment: what the config built.
      result: the Simulation's (or FedBuff's `AsyncResult`).
      summary: what summary.json holds.
      output_dir: the run directory.
      fedavg_virtual_time: FedBuff only: synchronous FedAvg's virtual time on the devices.
    """

    experiment: Experiment
    result: Any
    summary: dict
    output_dir: Path
    fedavg_virtual_time: float | None = None


def run(cfg: C.Config, *, overwrite: bool = False, resume: bool = False,
        progress: bool = True, announce: Callable[[str], Any] = print) -> Outcome:
    """Builds and runs `cfg` into its run directory (`output.dir`, or the next free
    `<dir>-N`); `resume` continues the run there from its newest checkpoint."""
    exp = build(cfg)
    if resume and isinstance(cfg.algorithm, C.FedBuff):
        raise ConfigError("algorithm fedbuff cannot resume (its asynchronous path keeps no "
                          "checkpoints)")
    output_dir = (Path(cfg.output.dir) if resume
                  else fresh_output_dir(cfg.output.dir, overwrite, announce))
    output_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, output_dir)
    if isinstance(cfg.algorithm, C.FedBuff):
        result, summary, fedavg_time = _run_async(exp, output_dir)
    else:
        sim = Simulation(exp.algorithm, exp.train, output_dir=output_dir, resume=resume,
                         progress=progress, sinks=cfg.output.sinks, **exp.simulation)
        result = sim.run(cfg.run.rounds)
        summary, fedavg_time = _summary(exp, result), None
    summary.update(seed=cfg.run.seed, chunk_size=result.chunk_size, environment=environment())
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (output_dir / "params.msgpack").write_bytes(
        flax.serialization.to_bytes(jax.device_get(result.params)))
    if cfg.run.chunk_size is None:  # the K the search chose: the rerun takes it
        write_config(C.replace(cfg, run=dataclasses.replace(cfg.run,
                                                            chunk_size=result.chunk_size)),
                     output_dir)
    return Outcome(exp, result, summary, output_dir, fedavg_time)


def _summary(exp: Experiment, result: SimulationResult) -> dict:
    cfg, final = exp.config, result.history[-1]
    attack, chain = cfg.aggregation.attack, exp.chain
    attacked = chain.adversary is not None
    names = [a.name for a in (attack.update, attack.data) if a.name != "none"]
    return {
        "rounds": cfg.run.rounds,
        "chunk_size_source": result.chunk_size_source,
        "seconds": result.timings,
        "train_loss": final["train_loss"],
        "eval": final.get("eval"),
        "eval_personal": final.get("eval_personal"),
        "privacy": result.privacy,
        "virtual_time": final.get("virtual_time"),
        "attack": None if not attacked else {
            "attack": "+".join(names), "aggregator": cfg.aggregation.rule.name,
            "malicious_clients": chain.adversary.malicious.tolist(),
            "success": final.get("attack_success", {}).get("accuracy")},
        "aggregator": cfg.aggregation.rule.name,
        "uplink_bits": final["uplink_bits"],
        "downlink_bits": final["downlink_bits"],
    }


# What a sweep runs differently from `Simulation` (by `Experiment.simulation` key): refused.
_NOT_IN_A_SWEEP = {
    "fine_tune": "evaluation.fine_tune_steps (a sweep evaluates the global models)",
    "eval_extra": "an attack's success metric (aggregation.attack)",
    "mesh": "run.mesh (a sweep splits its runs over the devices: sweep.devices)",
    "devices": "a device model ([devices])",
    "target_epsilon": "aggregation.privacy.target_epsilon (give noise_multiplier)",
}


def _sweep_arguments(exp: Experiment) -> dict:
    """`fs.Sweep`'s arguments beside the algorithm, train, seeds and grid; a config option a
    sweep cannot run is refused, naming it, before anything compiles."""
    cfg, sim = exp.config, dict(exp.simulation)
    if isinstance(cfg.algorithm, C.FedBuff):
        raise ConfigError("algorithm fedbuff cannot be swept (its rounds run on the host's "
                          "virtual clock)")
    for key, what in _NOT_IN_A_SWEEP.items():
        if sim.pop(key, None) not in (None, {}, ()):
            raise ConfigError(f"a sweep cannot run {what}")
    if cfg.run.rounds_per_call > 1 or cfg.checkpoint.every or cfg.run.resident is False or \
            cfg.run.client_store not in (None, "device"):
        raise ConfigError("a sweep keeps every run resident and round by round: it takes no "
                          "run.rounds_per_call, checkpoint.every, run.resident = false or "
                          "run.client_store")
    for key in ("seed", "resident", "client_store", "rounds_per_call", "checkpoint_every",
                "keep_checkpoints"):
        sim.pop(key, None)
    return dict(**sim, devices=cfg.sweep.devices, memory_budget=cfg.sweep.memory_budget,
                sinks=cfg.output.sinks)


def _grid_key(cfg: C.Config, name: str) -> str:
    """The config key a sweep's grid field sets, for each run's own config.toml."""
    side, _, option = name.partition(".")
    if option:
        return f"{side}_optimizer.{option}"
    if name == "clip_norm":
        return ("aggregation.rule.max_norm" if isinstance(cfg.aggregation.rule, C.NormBound)
                else "aggregation.privacy.clip")
    return {"client_lr": "client_optimizer.learning_rate",
            "server_lr": "server_optimizer.learning_rate", "mu": "algorithm.mu",
            "noise_multiplier": "aggregation.privacy.noise_multiplier"}[name]


def run_config(cfg: C.Config, values: dict, seed: int, output_dir: Path,
               chunk_size: int) -> C.Config:
    """The config of one run of a sweep: its grid values and seed set, no sweep, and the
    sweep's population pinned (`run.data_seed`), so `fedjax-sim run RUN_DIR/config.toml`
    makes that run alone."""
    updates = [C.nested(_grid_key(cfg, name), value) for name, value in values.items()]
    updates.append({"run": {"seed": seed, "chunk_size": chunk_size,
                            "data_seed": population_seed(cfg)},
                    "output": {"dir": str(output_dir)}})
    return C.load(base=C.replace(cfg, sweep=C.Sweep()), updates=updates)


@dataclass(frozen=True)
class SweepOutcome:
    """A finished sweep.

    Attributes:
      experiment: what the config built (its algorithm with the grid's fields traced).
      result: the `fs.sweep.SweepResult`.
      output_dir: the sweep directory: config.toml, sweep.json, one directory per run.
    """

    experiment: Experiment
    result: Any
    output_dir: Path


def sweep(cfg: C.Config, *, overwrite: bool = False, progress: bool = True,
          announce: Callable[[str], Any] = print) -> SweepOutcome:
    """Runs `cfg`'s `[sweep]` (seeds x grid) as one vmapped program into its directory
    (`output.dir`, or the next free `<dir>-N`): the sweep's config.toml and sweep.json, and
    per run a directory with the sinks' records, summary.json, params.msgpack and the
    run's own config.toml."""
    from fedjax_sim.sweep import Sweep

    exp = build(cfg)
    kwargs = _sweep_arguments(exp)
    seeds = list(range(cfg.run.seed, cfg.run.seed + cfg.sweep.seeds))
    grid = {k: list(v) for k, v in cfg.sweep.grid.items()}
    output_dir = fresh_output_dir(cfg.output.dir, overwrite, announce)
    runner = Sweep(exp.algorithm, exp.train, seeds=seeds, grid=grid, output_dir=output_dir,
                   progress=progress, **kwargs)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, output_dir)
    result = runner.run(cfg.run.rounds)
    env = environment()
    for run in result.runs:
        path = output_dir / run.name
        write_config(run_config(cfg, run.values, run.seed, path, result.chunk_size), path)
        summary = json.loads((path / "summary.json").read_text())
        (path / "summary.json").write_text(json.dumps({**summary, "environment": env},
                                                      indent=2))
    return SweepOutcome(exp, result, output_dir)


def _run_async(exp: Experiment, output_dir: Path) -> tuple[Any, dict, float]:
    """FedBuff in virtual time, beside synchronous FedAvg's clock for as many rounds."""
    cfg = exp.config
    m, seed = _concurrency(cfg), cfg.run.seed
    profiles = build_profiles(cfg.devices, exp.train.num_clients, seed)
    result = asynchronous.simulate_async(
        exp.algorithm, exp.train, profiles, concurrency=m, num_aggregations=cfg.run.rounds,
        seed=seed, eval_data=exp.eval_data, eval_every=cfg.evaluation.every,
        eval_clients=cfg.evaluation.clients, eval_batch_size=cfg.evaluation.batch_size,
        chunk_size=cfg.run.chunk_size or 1, output_dir=output_dir, sinks=cfg.output.sinks)
    final = result.history[-1]
    fedavg_time = float(asynchronous.fedavg_round_times(
        exp.algorithm, exp.train, profiles, cohort_size=m, rounds=cfg.run.rounds,
        seed=seed).sum())
    summary = {"algorithm": "fedbuff", "aggregations": cfg.run.rounds, "concurrency": m,
               "buffer_size": exp.algorithm.buffer_size, "staleness": cfg.algorithm.staleness,
               "seconds": result.timings, "virtual_time": final["virtual_time"],
               "fedavg_virtual_time": fedavg_time,
               "staleness_mean": float(np.mean([h["staleness_mean"]
                                                for h in result.history])),
               "train_loss": final["train_loss"], "eval": final.get("eval")}
    return result, summary, fedavg_time


__all__ = ["Chain", "Data", "Experiment", "Outcome", "RUN_FILES", "build", "build_algorithm",
           "build_chain", "build_device_model", "build_model", "build_optimizer",
           "build_profiles", "build_sampler", "compression_stages", "environment",
           "fresh_output_dir", "initial_params", "load_data", "rule_stages",
           "run", "run_config", "schedule", "sweep", "SweepOutcome"]
