"""The `fedjax-sim` command line.

`fedjax-sim run CONFIG.toml [--set key=value ...]` runs the experiment a config describes
(`fedjax_sim.config`); `fedjax-sim run` with no config trains FedAvg on the FedProx
Synthetic(1,1) task (1,000 clients, generated in-process, cohort 100) and prints the
per-client accuracy distribution. The run's flags are shorthands for config keys and apply
over the config; `--set` applies last. `fedjax-sim list` prints every data set, model,
algorithm, aggregator, compressor, attack, sampler and optimizer a config can name;
`fedjax-sim plot RUN_DIR [RUN_DIR ...]` plots run directories (`fedjax_sim.plots`).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

from fedjax_sim import config as C
from fedjax_sim import experiment, plots
from fedjax_sim import sinks as sinks_lib
from fedjax_sim.evaluation import format_summary
from fedjax_sim.health import DivergedError

MODELS = {"logistic": "logistic_regression", "mlp": "mlp"}
CLIENT_OPTIMIZERS = {"sgd": {"name": "sgd"}, "momentum": {"name": "sgd", "momentum": 0.9},
                     "adam": {"name": "adam"}}
SERVER_OPTIMIZERS = {"sgd": "sgd", "avgm": "fedavgm", "adam": "fedadam", "yogi": "fedyogi",
                     "adagrad": "fedadagrad"}
ALGORITHMS = ("fedavg", "ditto", "apfl", "pfedme", "fedrep", "fedper", "hypcluster", "ifca",
              "fedbuff")
ATTACKS = ("none", "sign_flip", "scaling", "gaussian", "label_flip", "alie")
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
               "norm_bound", "centered_clipping")
# Each rule's own flags: one given with another --aggregator is refused, not ignored.
ROBUST_FLAGS = {"trim": ("trimmed_mean",), "krum_f": ("krum", "multi_krum"),
                "krum_m": ("multi_krum",), "norm_bound": ("norm_bound",),
                "cc_tau": ("centered_clipping",)}


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)

def _sink_names(text: str) -> tuple[str, ...]:
    try:
        return sinks_lib.names(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


# The flags that set one config key each: (flag, type, key, help). Their defaults are the
# quick start's (`config.QUICK_START`), shown in --help; a flag not given changes nothing.
KEY_FLAGS = (
    ("--rounds", _positive_int, "run.rounds", "training rounds"),
    ("--cohort-size", _positive_int, "sampler.cohort_size", "clients sampled per round"),
    ("--num-clients", _positive_int, "data.num_clients", "clients in the Synthetic population"),
    ("--alpha", _non_negative_float, "data.alpha",
     "Synthetic: how much the clients' models differ"),
    ("--beta", _non_negative_float, "data.beta", "Synthetic: how much the clients' inputs differ"),
    ("--client-lr", _finite_float, "client_optimizer.learning_rate", "client learning rate"),
    ("--server-lr", _finite_float, "server_optimizer.learning_rate", "server learning rate"),
    ("--epochs", _positive_int, "algorithm.num_epochs", "local epochs per round"),
    ("--batch-size", _positive_int, "algorithm.batch_size", "examples per local step"),
    ("--max-examples-per-client", _positive_int, "algorithm.max_examples_per_client",
     "a larger client trains on its first this-many examples"),
    ("--eval-every", _non_negative_int, "evaluation.every",
     "evaluate every this many rounds (0: only after the last)"),
    ("--lam", _non_negative_float, "algorithm.lam",
     "Ditto's and pFedMe's lambda: the personal models' pull toward the global one"),
    ("--apfl-alpha", _finite_float, "algorithm.alpha",
     "APFL's initial mixing weight (adapted every step)"),
    ("--head", str, "algorithm.head", "FedRep/FedPer: the personal head, a regex over "
     "parameter paths (the MLP's last layer: Dense_1)"),
    ("--head-steps", _positive_int, "algorithm.head_steps",
     "FedRep: local steps on the head before the body's (default 5)"),
    ("--num-clusters", _positive_int, "algorithm.num_clusters",
     "HypCluster/IFCA: the number of models (each client trains and is evaluated with its "
     "best; default 2)"),
    ("--concurrency", _positive_int, "algorithm.concurrency",
     "FedBuff: clients training at once (default --cohort-size)"),
    ("--buffer-size", _positive_int, "algorithm.buffer_size",
     "FedBuff: arrivals per aggregation (default a tenth of the concurrency)"),
    ("--device-spread", _non_negative_float, "devices.sigma",
     "FedBuff: sigma of the log-normal per-example compute time (default 1.0)"),
    ("--trainable", str, "algorithm.trainable", "fedavg: train and send only the parameters "
     "whose path matches this regex (partial-model training; default all)"),
    ("--fine-tune-steps", _non_negative_int, "evaluation.fine_tune_steps",
     "at each evaluation, also fine-tune each test client this many local steps (client "
     "optimizer, batch size) on its own training split and evaluate that (0: the global "
     "model only; personalization algorithms report their own models)"),
    ("--eval-clients", _positive_int, "evaluation.clients",
     "evaluate a seeded sample of this many test clients (default all); the mean then comes "
     "with a 95%% confidence interval"),
    ("--chunk-size", _positive_int, "run.chunk_size",
     "clients vectorized side by side; unset: an earlier run's choice for the same program, "
     "else timed on round 1. A run's chunk_size reproduces it exactly"),
    ("--rounds-per-call", _positive_int, "run.rounds_per_call",
     "run up to this many rounds in one compiled program, cohorts drawn on the device"),
    ("--seed", _non_negative_int, "run.seed", "the seed every random choice derives from"),
    ("--output-dir", str, "output.dir", "the run directory; one holding an earlier run is "
     "kept and this run goes to the next free <dir>-N"),
    ("--sinks", _sink_names, "output.sinks", "where the records go in the run directory, "
     f"comma-separated, of {', '.join(sinks_lib.SINKS)} (fs.sinks; jsonl is what "
     "`fedjax-sim plot` reads)"),
    ("--checkpoint-every", _non_negative_int, "checkpoint.every",
     "a checkpoint every this many rounds (0: at the end and when stopped by SIGTERM or "
     "Ctrl-C)"),
    ("--bits", int, "aggregation.compression.bits",
     "quantize/hadamard: bits per entry, in [1, 32] (default 8)"),
    ("--topk-fraction", float, "aggregation.compression.fraction",
     "topk: the fraction of entries each client sends, in (0, 1] (default 0.01)"),
    ("--noise-multiplier", _non_negative_float, "aggregation.privacy.noise_multiplier",
     "DP: noise stddev over the clip (unset: calibrated to --target-epsilon)"),
    ("--target-epsilon", _positive_float, "aggregation.privacy.target_epsilon",
     "DP: the epsilon budget: calibrates the noise for --rounds when --noise-multiplier is "
     "unset, and the run stops before passing it"),
    ("--delta", _positive_float, "aggregation.privacy.delta",
     "DP: delta of the guarantee (default 1 / N^1.1 for N clients)"),
    ("--deadline", _positive_float, "devices.deadline", "seconds a round waits; later "
     "clients are dropped (or, with --keep-partial, keep the steps that fit)"),
    ("--over-selection", _finite_float, "devices.over_selection",
     "draw this many times --cohort-size clients and count the first --cohort-size to "
     "finish (1.3: 30%% more; default 1.0)"),
    ("--dropout", _non_negative_float, "devices.dropout",
     "each drawn client's chance of never reporting (default 0.0)"),
    ("--day-length", _positive_float, "devices.availability.period",
     "the diurnal period in virtual seconds (default 86400)"),
    ("--malicious-fraction", _finite_float, "aggregation.attack.malicious_fraction",
     "the malicious share of the population and of each cohort"),
    ("--trim", _non_negative_float, "aggregation.rule.beta",
     "trimmed_mean: the fraction dropped at each end, in [0, 0.5) (default 0.1)"),
    ("--krum-f", _non_negative_int, "aggregation.rule.f",
     "krum, multi_krum: the Byzantine clients tolerated, cohort > 2f + 2 (default 1)"),
    ("--krum-m", _positive_int, "aggregation.rule.m",
     "multi_krum: the clients averaged, at most cohort - f (default cohort - f)"),
    ("--norm-bound", _positive_float, "aggregation.rule.max_norm",
     "norm_bound: each update clipped to this L2 norm before the mean (default 1.0)"),
    ("--cc-tau", _positive_float, "aggregation.rule.tau",
     "centered_clipping: the clipping radius around the last aggregate (default 1.0)"),
)
SWITCHES = (("--eval-rolling", "evaluation.rolling",
             "with --eval-clients: a fresh sample at each evaluation"),
            ("--keep-partial", "devices.keep_partial", "late clients report the local steps "
             "that fit before the deadline (FedProx's partial work)"))


def _quick_start_value(key: str):
    obj = C.QUICK_START
    for part in key.split("."):
        obj = getattr(obj, part, None)
    return obj


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedjax-sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every data set, model, algorithm, aggregator, compressor, "
                   "attack, sampler and optimizer a config can name, with its options")
    run = sub.add_parser("run", help="run the experiment of a config (default: FedAvg on "
                         "Synthetic(1,1))", description="Runs the experiment a TOML config "
                         "describes (no config: the quick start, FedAvg on Synthetic(1,1)); "
                         "the flags are shorthands for config keys, applied over the config, "
                         "and --set applies last.")
    _add_experiment_flags(run, "a run directory's config.toml reruns that run")
    run.add_argument("--resume", action="store_true", help="continue the run in --output-dir "
                     "from its newest checkpoint, up to --rounds")
    run.set_defaults(subparser=run)  # errors found after parsing print run's own usage
    sweep = sub.add_parser("sweep", help="seeds x a grid of hyperparameters of a config, as "
                           "one vmapped program", description="Runs a config's [sweep] "
                           "(sweep.seeds runs of every combination of sweep.grid) as one "
                           "vmapped program; --grid and --seeds set them. The sweep directory "
                           "holds sweep.json and one run directory per run, each with its "
                           "own config.toml; `fedjax-sim plot DIR` draws seed means and bands.")
    _add_experiment_flags(sweep, "a sweep directory's config.toml reruns that sweep")
    sweep.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                       help="sweep.grid.FIELD: the values of one field, repeatable (fields: "
                       f"{', '.join(C.SWEEP_FIELDS)}, client.<option>, server.<option>), "
                       "e.g. --grid client_lr=0.01,0.03,0.1")
    sweep.add_argument("--seeds", type=_positive_int, default=None,
                       help="sweep.seeds: runs per grid point, seeded --seed, --seed + 1, ...")
    sweep.set_defaults(subparser=sweep)
    _plot_parser(sub)
    return parser


def _add_experiment_flags(parser: argparse.ArgumentParser, rerun: str) -> None:
    """The config, --set and the shorthand flags, shared by `run` and `sweep`."""
    add = parser.add_argument
    add("config", nargs="?", default=None,
        help=f"a TOML config (fedjax_sim.config; `fedjax-sim list` names the kinds); {rerun}")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="set a config key, e.g. --set aggregation.rule.name=krum (the value a TOML "
        "literal; a bare word is a string); repeatable, applied after the flags")
    add("--dry-run", action="store_true",
        help="print the resolved config and build the experiment (data, model, algorithm) "
        "without training")
    add("--overwrite", action="store_true", help="replace an earlier run in --output-dir")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--model", choices=sorted(MODELS), default=None,
        help="the model trained (default: logistic)")
    add("--algorithm", choices=sorted(ALGORITHMS), default=None,
        help="fedavg (FedOpt: any --server-optimizer), or a personalization algorithm: each "
        "client's own model is then evaluated beside the global one; fedbuff: asynchronous "
        "in virtual time (every algorithm of the library: a config's algorithm.name) "
        "(default: fedavg)")
    add("--client-optimizer", choices=sorted(CLIENT_OPTIMIZERS), default=None,
        help="the clients' local optimizer (default: sgd)")
    add("--server-optimizer", choices=sorted(SERVER_OPTIMIZERS), default=None,
        help="the server's optimizer on the averaged update (sgd at 1.0 is FedAvg; default: "
        "sgd)")
    add("--weighting", choices=["num_examples", "uniform"], default=None,
        help="how client updates are weighted in the average (default num_examples; uniform "
        "under DP)")
    add("--staleness", choices=["sqrt", "constant"], default=None,
        help="FedBuff: a stale update's weight, 1/sqrt(1 + staleness) or 1 (default: sqrt)")
    add("--compression", choices=["none", "quantize", "hadamard", "eden", "topk", "sign"],
        default=None, help="update compression (fs.compression): quantize: stochastic uniform "
        "to --bits; hadamard: a randomized Hadamard rotation, then quantize; eden: one bit per "
        "entry after a rotation; topk: the --topk-fraction largest entries with error "
        "feedback; sign: signSGD with majority vote (default: none)")
    add("--dp-clip", type=_positive_float, default=None,
        help="user-level DP (DP-FedAvg, McMahan et al. 2018), clients Poisson-sampled: clip "
        "each client's update to this L2 norm and add Gaussian noise to the sum")
    add("--devices", default=None,
        help="per-client compute and link speeds: 'lognormal' (phone-class defaults, "
        "seeded), a CSV (client,example_time_s,download_Bps,upload_Bps) or FedScale's "
        "device-capacity pickle (.pkl); turns the virtual clock on")
    add("--availability", choices=["always", "diurnal"], default=None,
        help="diurnal: each client is available half of every --day-length, from a seeded "
        "phase, and cohorts are drawn among the available (default: always)")
    add("--attack", choices=ATTACKS, default=None,
        help="a seeded set of malicious clients, the same share of every cohort: sign_flip: "
        "minus the honest update; scaling: the update boosted (model replacement); gaussian: "
        "N(0, s^2) noise in its place; label_flip: labels l -> 9 - l; alie: 'a little is "
        "enough' against the --aggregator (default: none)")
    add("--attack-scale", type=_positive_float, default=None,
        help="sign_flip's scale (default 1), scaling's factor (default the cohort size over "
        "--server-lr), gaussian's stddev (default 1)")
    add("--aggregator", choices=AGGREGATORS, default=None,
        help="robust aggregation (fs.robust): how the clients' updates are combined (default: "
        "mean)")
    for flag, kind, key, text in KEY_FLAGS:
        default = _quick_start_value(key)
        shown = f" (default: {default})" if default is not None and "default" not in text else ""
        add(flag, type=kind, default=None, dest=flag[2:].replace("-", "_"), metavar=key,
            help=text + shown)
    for flag, _, text in SWITCHES:
        add(flag, action="store_true", default=None, help=text)


def _plot_parser(sub) -> None:
    plot = sub.add_parser("plot", help="plot run directories (curves, per-client "
                          "distributions, seeds as mean and band)",
                          description=plots.__doc__.split("\n\n")[0],
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    plots.add_arguments(plot)
    plot.set_defaults(subparser=plot)


def _kind_updates(args: argparse.Namespace, base: C.Config) -> list[dict]:
    """The flags that pick a kind of a section, each with the base's values it keeps."""
    out = []
    if args.model is not None:
        out.append({"model": {"name": MODELS[args.model]}})
    if args.algorithm is not None:
        out.append({"algorithm": {"name": args.algorithm}})
        if args.algorithm == "fedbuff" and args.devices is None and isinstance(
                base.devices, C.NoDevices):
            out.append({"devices": {"name": "lognormal"}})  # FedBuff's seeded spread
    if args.client_optimizer is not None:
        out.append({"client_optimizer": {**CLIENT_OPTIMIZERS[args.client_optimizer],
                                         "learning_rate": base.client_optimizer.learning_rate}})
    if args.server_optimizer is not None:
        out.append({"server_optimizer": {"name": SERVER_OPTIMIZERS[args.server_optimizer],
                                         "learning_rate": base.server_optimizer.learning_rate}})
    if args.compression is not None:
        out.append({"aggregation": {"compression": {"name": args.compression}}})
    if args.aggregator is not None:
        out.append({"aggregation": {"rule": {"name": args.aggregator}}})
    if args.dp_clip is not None:
        out.append({"aggregation": {"privacy": {"name": "dp_fedavg", "clip": args.dp_clip}},
                    "sampler": {"name": "poisson",
                                "cohort_size": base.sampler.cohort_size}})
    if args.devices is not None:
        out.append({"devices": _devices_kind(args.devices)})
    if args.availability is not None:
        out.append({"devices": {"availability": {"name": args.availability}}})
    if args.attack not in (None, "none"):
        kind = args.attack
        part = "data" if kind == "label_flip" else "update"
        option = {"sign_flip": "scale", "scaling": "factor", "gaussian": "stddev"}.get(kind)
        table = {"name": kind}
        if args.attack_scale is not None:
            if option is None:
                raise C.ConfigError(f"--attack-scale is for --attack sign_flip, scaling or "
                                    f"gaussian, not {kind}")
            table[option] = args.attack_scale
        out.append({"aggregation": {"attack": {part: table}}})
    elif args.attack_scale is not None:
        raise C.ConfigError("--attack-scale needs --attack")
    return out


def _devices_kind(source: str) -> dict:
    if source == "lognormal":
        return {"name": "phones"}
    if source.endswith(".csv"):
        return {"name": "csv", "path": source}
    if source.endswith(".pkl"):
        return {"name": "fedscale", "path": source}
    raise C.ConfigError(f"--devices must be 'lognormal', a .csv or a FedScale .pkl file, got "
                        f"{source!r}")


def flag_updates(args: argparse.Namespace, base: C.Config) -> list[dict]:
    """The run's flags as config updates, in order: kinds first, then single keys."""
    rule = args.aggregator or base.aggregation.rule.name
    for dest, rules in ROBUST_FLAGS.items():
        if getattr(args, dest) is not None and rule not in rules:
            raise C.ConfigError(f"--{dest.replace('_', '-')} is for --aggregator "
                                f"{' or '.join(rules)}, not {rule}")
    if args.dp_clip is None and isinstance(base.aggregation.privacy, C.NoPrivacy):
        for flag in ("noise_multiplier", "target_epsilon", "delta"):
            if getattr(args, flag) is not None:
                raise C.ConfigError(f"--{flag.replace('_', '-')} needs --dp-clip (the clip "
                                    "norm of DP-FedAvg)")
    if args.devices is None and isinstance(base.devices, C.NoDevices):
        for flag in ("deadline", "keep_partial", "over_selection", "dropout", "day_length"):
            if getattr(args, flag) is not None:
                raise C.ConfigError(f"--{flag.replace('_', '-')} needs --devices (the "
                                    "clients' speeds)")
        if args.availability is not None:
            raise C.ConfigError("--availability needs --devices (the clients' speeds)")
    algorithm = args.algorithm or base.algorithm.name
    if args.trainable is not None and algorithm != "fedavg":
        raise C.ConfigError("--trainable is for --algorithm fedavg (FedRep/FedPer take --head)")
    updates = _kind_updates(args, base)
    if args.staleness is not None:
        updates.append({"algorithm": {"staleness": args.staleness}})
    for flag, _, key, _ in KEY_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            updates.append(C.nested(key, value))
    for flag, key, _ in SWITCHES:
        if getattr(args, flag[2:].replace("-", "_")):
            updates.append(C.nested(key, True))
    return updates


# `fedjax-sim sweep` with no config: the quick start's task, evaluated without fine-tuning
# (a sweep evaluates the global models).
SWEEP_START = C.replace(C.QUICK_START, evaluation=C.Evaluation(),
                        output=C.Output(dir="runs/sweep"))


def resolve(args: argparse.Namespace) -> C.Config:
    """The config a `run` or `sweep` command line describes: the file (or the quick start),
    the flags, then --set."""
    sweeping = args.command == "sweep"
    if args.config is not None:
        base = C.load(args.config)
    else:
        base = SWEEP_START if sweeping else C.QUICK_START
    updates = flag_updates(args, base)
    if sweeping:
        updates += [{"sweep": {"grid": dict([_grid_values(text)])}} for text in args.grid]
        if args.seeds is not None:
            updates.append({"sweep": {"seeds": args.seeds}})
    cfg = C.load(updates=updates, overrides=args.overrides, base=base)
    if sweeping and not cfg.sweep.grid and cfg.sweep.seeds == 1:
        raise C.ConfigError("a sweep of one run: give --grid FIELD=V1,V2,... or --seeds N "
                            "(sweep.grid, sweep.seeds)")
    if not sweeping and (cfg.sweep.grid or cfg.sweep.seeds > 1):
        raise C.ConfigError("this config describes a sweep (sweep.grid or sweep.seeds): run it "
                            "with `fedjax-sim sweep`")
    return cfg


def _grid_values(text: str) -> tuple[str, list[float]]:
    name, sep, values = text.partition("=")
    try:
        numbers = [float(v) for v in values.split(",")] if sep and values else None
    except ValueError:
        numbers = None
    if not name.strip() or numbers is None or not all(map(math.isfinite, numbers)):
        raise C.ConfigError(f"--grid takes FIELD=V1,V2,... with numbers, got {text!r}")
    return name.strip(), numbers


def report(outcome: experiment.Outcome) -> None:
    """What a finished run prints: its times, its privacy, clock and compression, and the
    per-client accuracy distribution."""
    exp, result, cfg = outcome.experiment, outcome.result, outcome.experiment.config
    if isinstance(cfg.algorithm, C.FedBuff):
        return _report_async(outcome)
    final, t, rounds = result.history[-1], result.timings, cfg.run.rounds
    choice = {"search": f"chunk-size search {t['chunk_size_choice_s']:.1f} s (its compiles "
                        f"included; chose K = {result.chunk_size}, kept for the next run)",
              "cache": f"chunk size {result.chunk_size} from an earlier run's search "
                       f"({t['chunk_size_choice_s']:.1f} s)",
              "given": f"chunk size {result.chunk_size} (given)",
              "checkpoint": f"chunk size {result.chunk_size} (the resumed run's)",
              }[result.chunk_size_source]
    before = [choice] + ([f"compile {t['compile_s']:.1f} s"] if t["compile_s"] else [])
    print(f"\n{rounds} rounds in {t['rounds_s']:.1f} s ({1000 * t['rounds_s'] / rounds:.0f} "
          f"ms a round); before them {', '.join(before)}; evaluation {t['eval_s']:.1f} s")
    spec = cfg.aggregation.privacy
    if result.privacy is not None:
        p = result.privacy
        clip = f", clip {spec.clip:g}" if hasattr(spec, "clip") else ""
        print(f"user-level DP: epsilon {p['epsilon']:.3g} at delta {p['delta']:.3g} after "
              f"{p['rounds']} rounds (noise multiplier {exp.chain.noise_multiplier:.4g}"
              f"{clip}, {p['accountant'].upper()} accountant)")
    if not isinstance(cfg.devices, C.NoDevices):
        h = result.history
        print(f"virtual clock: {final['virtual_time']:.1f} s of the simulated federation "
              f"({final['virtual_time'] / len(h):.2f} s a round); clients dropped out "
              f"{sum(r['num_dropped'] for r in h)}, late {sum(r['num_late'] for r in h)} "
              f"of {sum(r['num_sampled'] for r in h)} drawn")
    if not isinstance(cfg.aggregation.compression, C.NoCompression):
        print(f"compression {cfg.aggregation.compression.name}: {final['uplink_bits']:,} bits "
              f"uploaded per client, {final['downlink_bits'] / final['uplink_bits']:.1f}x "
              f"fewer than the {final['downlink_bits']:,} of the float32 update")
    if "eval" in final:
        _report_eval(exp, final)
    print(f"records: {_written(outcome)}; rerun exactly with --seed "
          f"{cfg.run.seed} --chunk-size {result.chunk_size}, or `fedjax-sim run "
          f"{outcome.output_dir}/config.toml`")


def _report_eval(exp: experiment.Experiment, final: dict) -> None:
    cfg, acc = exp.config, final["eval"]["accuracy"]
    evaluated = len(final["eval_clients"]["client_id"])
    classes = exp.data.num_classes
    chance = f" (chance {1 / classes:.2f})" if classes else ""
    print(f"per-client {cfg.evaluation.on} accuracy over {evaluated} of "
          f"{exp.eval_data.num_clients} clients{chance}:")
    personal = exp.algorithm.personal is not None
    name = cfg.algorithm.name
    what = "fine-tuning" if not personal else f"{name}'s personal model"
    tuned = (f"{name}'s personal models:" if personal
             else f"fine-tuned, {cfg.evaluation.fine_tune_steps} steps:")
    width = len(tuned) + 1
    print(f"  {'global model:':<{width}}{format_summary(acc)}")
    if "eval_personal" in final:
        print(f"  {tuned:<{width}}{format_summary(final['eval_personal']['accuracy'])}")
        gain = final["eval_personal_fairness"]
        print(f"  {what} helps {gain['helped']:.0%} of clients, hurts {gain['hurt']:.0%}")
    chain = exp.chain
    if chain.adversary is not None:
        attack = cfg.aggregation.attack
        names = "+".join(a.name for a in (attack.update, attack.data) if a.name != "none")
        where = (f"{chain.malicious_per_round} of the {cfg.sampler.cohort_size} clients of "
                 "each round malicious" if chain.malicious_per_round is not None else
                 f"each cohort's malicious are whichever {cfg.sampler.name} sampling draws")
        print(f"attack {names} against the {cfg.aggregation.rule.name}: "
              f"{len(chain.adversary.malicious)} of {exp.train.num_clients} clients "
              f"malicious, {where}")
        if "attack_success" in final:
            print(f"  attack success {final['attack_success']['accuracy']:.3f} (the share of "
                  "test examples the global model puts in their flipped class)")
    if (isinstance(cfg.data, C.Synthetic) and cfg.data.alpha > 0
            and acc["p50"] < 0.5 * acc["weighted_mean"]):
        print("  (Synthetic(alpha, beta) draws each client's labels from its own model: one "
              "global model serves the large clients, and the median client needs its own; "
              "see the README)")


def _report_async(outcome: experiment.Outcome) -> None:
    cfg, result, s = outcome.experiment.config, outcome.result, outcome.summary
    final = result.history[-1]
    print(f"\n{cfg.run.rounds} FedBuff aggregations (K = {s['buffer_size']} of M = "
          f"{s['concurrency']} in flight) in {final['virtual_time']:.1f} virtual s; "
          f"synchronous FedAvg's {cfg.run.rounds} rounds of {s['concurrency']} would take "
          f"{outcome.fedavg_virtual_time:.1f} virtual s on the same devices")
    print(f"mean staleness {s['staleness_mean']:.2f}; wall "
          f"{result.timings['aggregations_s']:.1f} s (compile {result.timings['compile_s']:.1f} s)")
    if "eval" in final:
        exp = outcome.experiment
        print(f"per-client {cfg.evaluation.on} accuracy over "
              f"{len(final['eval_clients']['client_id'])} of {exp.eval_data.num_clients} "
              f"clients:\n  global model: {format_summary(final['eval']['accuracy'])}")
    print(f"records: {_written(outcome)}")


def _written(outcome: experiment.Outcome) -> str:
    """The sinks' files in the run directory, for the closing line."""
    names = outcome.experiment.config.output.sinks
    files = [f"{outcome.output_dir}/{f}" for n in names for f in sinks_lib.SINKS[n].files]
    return ", ".join(files) or "none (output.sinks is empty)"


def report_sweep(outcome: experiment.SweepOutcome) -> None:
    """Each grid point's final train loss and test accuracy over its seeds, as the mean and
    its 95% confidence interval (Student's t)."""
    result, cfg = outcome.result, outcome.experiment.config
    t = result.timings
    print(f"\n{len(result.runs)} runs x {cfg.run.rounds} rounds in {len(result.groups)} "
          f"vmapped group(s) of K = {result.chunk_size}: compile {t['compile_s']:.1f} s, "
          f"rounds {t['rounds_s']:.1f} s, evaluation {t['eval_s']:.1f} s")
    points: dict[str, list[int]] = {}
    for i, run in enumerate(result.runs):
        label = ", ".join(f"{k}={v:g}" for k, v in run.values.items()) or "(seeds)"
        points.setdefault(label, []).append(i)
    for label, runs in points.items():
        finals = [result.histories[i][-1] for i in runs]
        parts = [_mean_ci("train loss", [f["train_loss"] for f in finals])]
        if all("eval" in f for f in finals):
            parts.append(_mean_ci(f"{cfg.evaluation.on} accuracy",
                                  [f["eval"]["accuracy"]["weighted_mean"] for f in finals]))
        print(f"  {label}: {'; '.join(parts)} ({len(runs)} seeds)")
    print(f"sweep: {outcome.output_dir}/sweep.json and a directory per run (each reruns alone "
          f"with `fedjax-sim run RUN_DIR/config.toml`); `fedjax-sim plot {outcome.output_dir}` "
          "draws the seeds' means and bands")


def _mean_ci(name: str, values: list[float]) -> str:
    mean, low, high = plots.mean_band(values)
    return f"{name} {float(mean):.4f} +- {float(high - mean):.4f}"


def _describe_data(exp: experiment.Experiment) -> str:
    spec = exp.config.data
    name = (f"Synthetic({spec.alpha:g},{spec.beta:g})" if isinstance(spec, C.Synthetic)
            else spec.name)
    test = "" if exp.data.test is None else f"\n  test {exp.data.test}"
    return f"{name}: train {exp.train}{test}"


def run(args: argparse.Namespace) -> dict | None:
    cfg = resolve(args)
    if args.dry_run:
        print(C.dumps(cfg), end="")
        exp = experiment.build(cfg)
        print(f"# built: {_describe_data(exp)}\n# model and algorithm ready; nothing trained")
        return None
    if args.command == "sweep":
        outcome = experiment.sweep(cfg, overwrite=args.overwrite, progress=not args.no_progress)
        print(_describe_data(outcome.experiment))
        report_sweep(outcome)
        return None
    outcome = experiment.run(cfg, overwrite=args.overwrite, resume=args.resume,
                             progress=not args.no_progress)
    print(_describe_data(outcome.experiment))
    report(outcome)
    return outcome.summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # dp-accounting logs each RDP order it drops as inexact; the bound stays valid without it.
    logging.getLogger("absl").setLevel(logging.ERROR)
    if args.command == "list":
        print(C.describe(), end="")
        return 0
    if args.command == "plot":
        try:
            plots.main(args)
        except (ValueError, ImportError) as e:
            args.subparser.error(str(e))
        return 0
    try:
        run(args)
    except (ValueError, TypeError, ImportError) as e:  # a bad config: say which, not where
        args.subparser.error(str(e))
    except DivergedError as e:
        print(f"fedjax-sim run: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
