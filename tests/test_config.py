"""The config schema (`fedjax_sim.config`): reading, checking and writing, and every committed
example config building against it. Nothing here trains."""

import dataclasses
import inspect
import typing
from pathlib import Path

import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import cli
from fedjax_sim import config as C
from fedjax_sim import experiment as E

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.toml"))


def test_a_config_written_reads_back_equal_through_every_kind():
    assert C.load(text=C.dumps(C.QUICK_START), base=C.Config()) == C.QUICK_START
    # Every registered kind, with its defaults, survives the round trip inside a config.
    for base, key in ((C.Dataset, "data"), (C.ModelSpec, "model"), (C.Algorithm, "algorithm"),
                      (C.Optimizer, "client_optimizer"), (C.Sampler, "sampler")):
        for kind in base.registry.values():
            cfg = C.replace(C.Config(), **{key: kind()})
            if isinstance(cfg.algorithm, C.FedBuff):
                cfg = C.replace(cfg, devices=C.Lognormal())
            text = C.dumps(cfg)
            assert C.tomllib.loads(text)[key]["name"] == kind.name
            assert C._section(C.tomllib.loads(text), C.Config, "") == cfg
    nested = C.load(overrides=[
        "aggregation.rule.name=multi_krum", "aggregation.rule.f=2",
        "aggregation.compression=topk", "aggregation.attack.update=alie",
        "aggregation.attack.data=label_flip", "client_optimizer.schedule.name=cosine_decay",
        "client_optimizer.schedule.over=rounds", "devices=phones",
        "devices.availability.name=diurnal", "devices.availability.period=600.0"])
    assert nested.aggregation.rule == C.MultiKrum(f=2)
    assert nested.devices.availability == C.Diurnal(period=600.0)
    assert C.load(text=C.dumps(nested)) == nested


def test_an_optional_option_defaults_to_none_so_toml_can_leave_it_out():
    # TOML has no null: an `X | None` field with another default could never be unset.
    for base in C.GROUPS:
        for kind in base.registry.values():
            hints = typing.get_type_hints(kind)
            for f in dataclasses.fields(kind):
                if type(None) in typing.get_args(hints[f.name]):
                    assert f.default is None, f"{base.group} {kind.name}.{f.name}"


def test_set_values_are_toml_literals_and_a_bare_word_is_a_string():
    assert C.parse_override("run.rounds=5") == {"run": {"rounds": 5}}
    assert C.parse_override("model.hidden=[64, 32]") == {"model": {"hidden": [64, 32]}}
    assert C.parse_override("aggregation.rule=krum") == {"aggregation": {"rule": "krum"}}
    assert C.parse_override("evaluation.rolling=true") == {"evaluation": {"rolling": True}}
    cfg = C.load(overrides=["model=mlp", "model.hidden=[64, 32]", "run.rounds=5"])
    assert cfg.model == C.Mlp(hidden=(64, 32)) and cfg.run.rounds == 5
    with pytest.raises(C.ConfigError, match="key=value"):
        C.parse_override("run.rounds")


def test_another_kind_replaces_the_old_kinds_options_and_keeps_the_rest():
    base = C.load(overrides=["aggregation.rule.name=krum", "aggregation.rule.f=3",
                             "aggregation.weighting=uniform"])
    changed = C.load(text=C.dumps(base), overrides=["aggregation.rule=median"])
    assert changed.aggregation.rule == C.Median()
    assert changed.aggregation.weighting == "uniform"
    for order in (["aggregation.rule.f=2", "aggregation.rule.name=krum"],
                  ["aggregation.rule.name=krum", "aggregation.rule.f=2"]):
        assert C.load(overrides=order).aggregation.rule == C.Krum(f=2)


@pytest.mark.parametrize("overrides, message", [
    (["evalution.every=3"], "unknown config key 'evalution'; did you mean 'evaluation'?"),
    (["evaluation.evry=3"],
     "unknown config key 'evaluation.evry'; did you mean 'evaluation.every'?"),
    (["aggregation.rule.f=2"],
     "config key 'aggregation.rule.f' is not an option of 'mean': it is krum, multi_krum's"),
    (["run.rounds=1.5"], "run.rounds must be an integer, got 1.5"),
    (["client_optimizer.learning_rate=fast"],
     "client_optimizer.learning_rate must be a number, got 'fast'"),
    (["evaluation.on=validation"], "evaluation.on must be 'test' or 'train'"),
    (["algorithm=fedavgg"], "algorithm: 'fedavgg' is unknown; did you mean 'fedavg'? "
                            "(algorithms: agnostic_fedavg, apfl, ditto, fedavg, fedbuff"),
    (["data.name=leaf", "data.path=/no/such/leaf.json"],
     "data.path: '/no/such/leaf.json' does not exist"),
    (["data.name=leaf"], "data.path is required for data 'leaf'"),
    (["aggregation.privacy=secagg", "aggregation.rule=median"],
     "aggregation.privacy secagg sums the masked updates: it cannot take aggregation.rule "
     "'median'"),
    (["aggregation.privacy.name=dp_fedavg", "aggregation.privacy.noise_multiplier=1.0",
      "aggregation.rule=krum"], "aggregation.rule 'krum' replaces the mean that dp_fedavg "
                                "noises"),
    (["aggregation.privacy=dp_fedavg"], "dp_fedavg needs noise_multiplier or target_epsilon"),
    (["aggregation.privacy.name=dp_ftrl", "aggregation.privacy.noise_multiplier=1.0"],
     "dp_ftrl is accounted for cyclic participation"),
    (["aggregation.privacy=secagg", "aggregation.compression=sign"],
     "secagg quantizes into its own ring"),
    (["algorithm=ifca", "aggregation.rule=median"], "algorithm ifca takes no aggregation chain"),
    (["algorithm=fedbuff"], "algorithm fedbuff runs in virtual time: it needs [devices]"),
    (["algorithm=fedbuff", "devices=lognormal", "devices.deadline=3.0"],
     "devices.deadline is a policy of synchronous rounds"),
    (["aggregation.attack.malicious_fraction=1.5"], "malicious_fraction must be in [0, 1]"),
    (["server_optimizer.schedule.over=rounds"], "the server steps once a round"),
    (["run.rounds_per_call=4", "sampler=poisson"],
     "run.rounds_per_call > 1 draws each cohort on the device, uniformly"),
    (["run.rounds_per_call=4", "devices=lognormal"],
     "run.rounds_per_call > 1 cannot run a device model"),
    (["run.rounds_per_call=4", "run.client_store=host"],
     "run.rounds_per_call > 1 needs the population and the client store on the device"),
    (["output.sinks=['jsonl', 'tensorbord']"],
     "output.sinks: unknown sink 'tensorbord' (did you mean 'tensorboard'?)"),
])
def test_bad_input_is_refused_with_a_message_naming_it(overrides, message):
    with pytest.raises(C.ConfigError) as e:
        C.load(overrides=overrides)
    assert message in str(e.value)


def test_a_file_that_is_missing_or_not_toml_is_named(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds = 3\n")
    with pytest.raises(C.ConfigError, match="is not valid TOML"):
        C.load(bad)


def _public_functions(module, exclude=()):
    return {n for n in dir(module) if not n.startswith("_") and n not in exclude
            and inspect.isfunction(getattr(module, n))
            and getattr(getattr(module, n), "__module__", "").startswith(module.__name__)}


def test_every_algorithm_rule_compressor_sampler_data_set_and_model_has_a_config_name():
    names = lambda base: set(base.registry)
    helpers = {"optimizer_client_update", "with_hparams", "stacked_model", "scale_by_fedopt",
               "fedopt"}  # fedopt is fedavg (the same function); server rules are optimizers
    server_rules = {"fedavgm", "fedadam", "fedyogi", "fedadagrad"}
    algos = {n for n in fs.algorithms.__all__ if n[0].islower()} - helpers - server_rules
    assert algos <= names(C.Algorithm), algos - names(C.Algorithm)
    assert server_rules <= names(C.Optimizer)
    assert _public_functions(fs.robust, {"clip", "stage"}) <= names(C.Rule)
    stages = {"quantize": "quantize", "hadamard_rotation": "hadamard", "drive": "eden",
              "top_k": "topk", "sign_sgd": "sign"}
    assert set(stages.values()) <= names(C.Compression)
    assert {n for n in _public_functions(fs.sampling, {"sample_cohort"})} <= names(C.Sampler)
    loaders = {"synthetic", "femnist", "shakespeare", "emnist_tff", "emnist_fedjax",
               "cifar100_tff", "shakespeare_tff", "stackoverflow_tff"}
    assert loaders <= names(C.Dataset)
    assert {"leaf", "tff_sqlite", "fedjax_sqlite", "partition", "npy",
            "store_sqlite"} <= names(C.Dataset)
    zoo = {"logistic_regression", "mlp", "emnist_cnn", "resnet18_gn", "char_lstm", "word_lstm",
           "causal_transformer"}
    assert zoo <= names(C.ModelSpec)
    assert {"sign_flip", "scaling", "gaussian", "alie"} <= names(C.UpdateAttack)
    assert {"label_flip", "backdoor"} <= names(C.DataAttack)


def test_list_prints_every_group_and_kind(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for base in C.GROUPS:
        assert f"{base.group}:" in out
        for name in base.registry:
            assert f"\n  {name} " in out
    assert "options: f=1" in out  # krum's, with its default


def test_the_optimizers_built_match_optax_step_by_step():
    params = {"w": np.ones(3, np.float32)}
    grads = {"w": np.array([0.5, -1.0, 2.0], np.float32)}
    cases = [(C.Sgd(learning_rate=0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9)),
             (C.Adam(learning_rate=0.01, schedule=C.CosineDecay(decay_steps=4)),
              optax.adam(optax.cosine_decay_schedule(0.01, 4))),
             (C.Sgd(learning_rate=0.2, schedule=C.PiecewiseConstant(boundaries=(2,),
                                                                     scales=(0.5,))),
              optax.sgd(optax.piecewise_constant_schedule(0.2, {2: 0.5})))]
    for spec, reference in cases:
        built = E.build_optimizer(spec)
        s1, s2 = built.init(params), reference.init(params)
        for _ in range(4):
            u1, s1 = built.update(grads, s1, params)
            u2, s2 = reference.update(grads, s2, params)
            np.testing.assert_array_equal(u1["w"], u2["w"])
    per_round = E.build_optimizer(C.Sgd(learning_rate=1.0, schedule=C.Linear(
        over="rounds", end_value=0.0, transition_steps=10)))
    update, _ = per_round(5).update(grads, per_round(5).init(params), params)
    np.testing.assert_allclose(update["w"], -0.5 * grads["w"])  # half way down at round 5


def test_legacy_flags_are_shorthands_for_config_keys():
    args = cli.build_parser().parse_args([
        "run", "--aggregator", "krum", "--krum-f", "2", "--client-optimizer", "adam",
        "--dp-clip", "0.5", "--noise-multiplier", "1.0", "--cohort-size", "20"])
    with pytest.raises(C.ConfigError, match="replaces the mean that dp_fedavg noises"):
        cli.resolve(args)
    args = cli.build_parser().parse_args([
        "run", "--aggregator", "krum", "--krum-f", "2", "--client-optimizer", "adam",
        "--cohort-size", "20", "--devices", "lognormal", "--deadline", "4",
        "--attack", "scaling", "--attack-scale", "3", "--set", "run.rounds=7"])
    cfg = cli.resolve(args)
    assert cfg.aggregation.rule == C.Krum(f=2)
    assert cfg.client_optimizer == C.Adam(learning_rate=0.05)  # the quick start's lr kept
    assert cfg.sampler == C.Uniform(cohort_size=20)
    assert cfg.devices == C.Phones(deadline=4.0)
    assert cfg.aggregation.attack.update == C.Scaling(factor=3.0)
    assert cfg.run.rounds == 7 and cfg.algorithm.max_examples_per_client == 500
    dp = cli.resolve(cli.build_parser().parse_args(["run", "--dp-clip", "0.5",
                                                    "--target-epsilon", "4"]))
    assert dp.sampler == C.Poisson(cohort_size=100)
    assert dp.aggregation.privacy == C.DpFedAvg(clip=0.5, target_epsilon=4.0)
    assert cli.resolve(cli.build_parser().parse_args(["run"])) == C.QUICK_START


def _buildable(path: Path) -> list[str]:
    """--set values that let a committed config build here quickly: the shared data where the
    default location is missing, and smaller populations for the largest."""
    cfg = C.load(path)
    overrides = []
    npz = SHARED / "femnist_leaf" / "femnist_leaf_sf005_105writers.npz"
    text = SHARED / "tinyshakespeare" / "input.txt"
    if isinstance(cfg.data, C.Femnist | C.Shakespeare | C.Partition):
        needed = text if isinstance(cfg.data, C.Shakespeare) else npz
        if not needed.is_file():
            pytest.skip(f"needs {needed}")
        key = "data.pool_path" if isinstance(cfg.data, C.Partition) else "data.path"
        overrides.append(f"{key}={str(needed)!r}")
    if isinstance(cfg.data, C.Synthetic) and cfg.data.num_clients > 10_000:
        overrides.append("data.num_clients=2000")
    if isinstance(cfg.aggregation.privacy, C.DpFtrl | C.DpFedAvg):
        overrides.append("aggregation.privacy.noise_multiplier=1.0")  # no calibration search
    return overrides


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_committed_example_config_loads_and_builds(path):
    cfg = C.load(path, overrides=_buildable(path))
    exp = E.build(cfg)  # data, model, algorithm, Simulation arguments; nothing compiled
    assert exp.train.num_clients >= cfg.sampler.cohort_size
    first = path.read_text().splitlines()[0]
    if path.stem != "quick_start":  # each names the example it reproduces
        assert (ROOT / first.split()[1].rstrip(",:")).is_file(), first


def test_every_example_has_a_config_but_the_one_that_pretrains_centrally():
    named = {path.read_text().split()[1].rstrip(",:") for path in CONFIGS}
    scripts = {f"examples/{p.name}" for p in (ROOT / "examples").glob("*.py")}
    # shakespeare_lora.py pretrains its base centrally before federating (not a run).
    assert scripts - named == {"examples/shakespeare_lora.py"}


def test_the_quick_start_config_is_the_no_argument_run():
    assert C.load(ROOT / "examples" / "configs" / "quick_start.toml") == C.QUICK_START
