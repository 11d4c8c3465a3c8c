"""The `fedjax-sim` command line.

`fedjax-sim run` with no arguments trains FedAvg on the FedProx Synthetic(1,1) task (1,000
clients, generated in-process, cohort 100) and prints the per-client accuracy distribution.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import optax

from fedjax_sim import (
    aggregators,
    algorithms,
    asynchronous,
    attacks,
    compression,
    data,
    devices,
    evaluation,
    models,
    privacy,
    robust,
    sampling,
)
from fedjax_sim.data.synthetic import NUM_CLASSES, NUM_FEATURES
from fedjax_sim.evaluation import format_summary
from fedjax_sim.health import DivergedError
from fedjax_sim.simulation import simulate

CLIENT_OPTIMIZERS = {
    "sgd": lambda lr: optax.sgd(lr),
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "adam": lambda lr: optax.adam(lr),
}
SERVER_OPTIMIZERS = {
    "sgd": lambda lr: optax.sgd(lr),
    "avgm": lambda lr: algorithms.fedavgm(lr),
    "adam": lambda lr: algorithms.fedadam(lr),
    "yogi": lambda lr: algorithms.fedyogi(lr),
    "adagrad": lambda lr: algorithms.fedadagrad(lr),
}
RUN_FILES = ("history.jsonl", "summary.json", "checkpoints")
ROBUST_AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum",
                      "geometric_median", "norm_bound", "centered_clipping")
ALGORITHMS = ("fedavg", "ditto", "apfl", "pfedme", "fedrep", "fedper", "hypcluster", "ifca",
              "fedbuff")
ATTACKS = ("none", "sign_flip", "scaling", "gaussian", "label_flip", "alie")
MODELS = {
    "logistic": lambda f, c: models.logistic_regression(f, c),
    "mlp": lambda f, c: models.mlp(f, c),
}


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


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedjax-sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a simulation (default: FedAvg on Synthetic(1,1))",
                         description="FedAvg-family training on the FedProx Synthetic(alpha, "
                         "beta) task, then per-client test accuracy.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = run.add_argument
    add("--rounds", type=_positive_int, default=200, help="training rounds")
    add("--cohort-size", type=_positive_int, default=100, help="clients sampled per round")
    add("--num-clients", type=_positive_int, default=1000,
        help="clients in the Synthetic population")
    add("--alpha", type=_non_negative_float, default=1.0,
        help="Synthetic: how much the clients' models differ")
    add("--beta", type=_non_negative_float, default=1.0,
        help="Synthetic: how much the clients' inputs differ")
    add("--model", choices=sorted(MODELS), default="logistic", help="the model trained")
    add("--algorithm", choices=sorted(ALGORITHMS), default="fedavg",
        help="fedavg (FedOpt: any --server-optimizer), or a personalization algorithm: each "
        "client's own model is then evaluated beside the global one")
    add("--client-optimizer", choices=sorted(CLIENT_OPTIMIZERS), default="sgd",
        help="the clients' local optimizer")
    add("--client-lr", type=_finite_float, default=0.05, help="client learning rate")
    add("--server-optimizer", choices=sorted(SERVER_OPTIMIZERS), default="sgd",
        help="the server's optimizer on the averaged update (sgd at 1.0 is FedAvg)")
    add("--server-lr", type=_finite_float, default=1.0, help="server learning rate")
    add("--epochs", type=_positive_int, default=1, help="local epochs per round")
    add("--batch-size", type=_positive_int, default=10, help="examples per local step")
    add("--max-examples-per-client", type=_positive_int, default=500,
        help="a larger client trains on its first this-many examples")
    add("--weighting", choices=["num_examples", "uniform"], default=None,
        help="how client updates are weighted in the average (default num_examples; "
        "uniform under DP)")
    add("--eval-every", type=_non_negative_int, default=20,
        help="evaluate every this many rounds (0: only after the last)")
    add("--lam", type=_non_negative_float, default=0.1,
        help="Ditto's and pFedMe's lambda: the personal models' pull toward the global one")
    add("--apfl-alpha", type=_finite_float, default=0.5,
        help="APFL's initial mixing weight (adapted every step)")
    add("--head", default="Dense_1",
        help="FedRep/FedPer: the personal head, a regex over parameter paths (the MLP's last "
        "layer by default)")
    add("--head-steps", type=_positive_int, default=5,
        help="FedRep: local steps on the head before the body's")
    add("--num-clusters", type=_positive_int, default=2,
        help="HypCluster/IFCA: the number of models (each client trains and is evaluated "
        "with its best)")
    fedbuff = run.add_argument_group(
        "asynchronous FedBuff (Nguyen et al. 2022) in virtual time, on a seeded log-normal "
        "spread of device speeds; --rounds counts aggregations")
    fedbuff.add_argument("--concurrency", type=_positive_int, default=None,
                         help="clients training at once (default --cohort-size)")
    fedbuff.add_argument("--buffer-size", type=_positive_int, default=None,
                         help="arrivals per aggregation (default a tenth of the concurrency)")
    fedbuff.add_argument("--staleness", choices=["sqrt", "constant"], default="sqrt",
                         help="a stale update's weight: 1/sqrt(1 + staleness) or 1")
    fedbuff.add_argument("--device-spread", type=_non_negative_float, default=1.0,
                         help="sigma of the log-normal per-example compute time")
    add("--trainable", default=None,
        help="fedavg: train and send only the parameters whose path matches this regex "
        "(partial-model training; default all)")
    add("--fine-tune-steps", type=_non_negative_int, default=20,
        help="fedavg: at each evaluation, also fine-tune each test client this many local "
        "steps (client optimizer and lr, batch size) on its own training split and evaluate "
        "that (0: the global model only)")
    add("--eval-clients", type=_positive_int, default=None,
        help="evaluate a seeded sample of this many test clients (default all); the mean "
        "then comes with a 95%% confidence interval")
    add("--eval-rolling", action="store_true",
        help="with --eval-clients: a fresh sample at each evaluation")
    add("--chunk-size", type=_positive_int, default=None,
        help="clients vectorized side by side; unset: an earlier run's choice for the same "
        "program, else timed on round 1. A run's chunk_size reproduces it exactly")
    add("--seed", type=_non_negative_int, default=0, help="the seed every random choice "
        "derives from")
    add("--output-dir", default="runs/synthetic",
        help="where history.jsonl and summary.json go; one holding an earlier run is kept "
        "and this run goes to the next free <dir>-N")
    add("--overwrite", action="store_true", help="replace an earlier run in --output-dir")
    add("--resume", action="store_true",
        help="continue the run in --output-dir from its newest checkpoint, up to --rounds")
    add("--checkpoint-every", type=_non_negative_int, default=0,
        help="a checkpoint every this many rounds (0: at the end and when stopped by "
        "SIGTERM or Ctrl-C)")
    add("--no-progress", action="store_true", help="no progress bar")
    comp = run.add_argument_group("update compression (fs.compression): each client encodes "
                                  "its update, the server decodes")
    comp.add_argument("--compression", default="none",
                      choices=["none", "quantize", "hadamard", "eden", "topk", "sign"],
                      help="quantize: stochastic uniform to --bits; hadamard: a randomized "
                      "Hadamard rotation, then quantize; eden: one bit per entry after a "
                      "rotation (DRIVE/EDEN); topk: the --topk-fraction largest entries with "
                      "error feedback; sign: signSGD with majority vote (--server-lr is the "
                      "step)")
    comp.add_argument("--bits", type=int, default=8,
                      help="quantize/hadamard: bits per entry, in [1, 32]")
    comp.add_argument("--topk-fraction", type=float, default=0.01,
                      help="topk: the fraction of entries each client sends, in (0, 1]")
    dp = run.add_argument_group("user-level differential privacy (DP-FedAvg, McMahan et al. "
                                "2018): clients Poisson-sampled at rate cohort / population")
    dp.add_argument("--dp-clip", type=_positive_float, default=None,
                    help="clip each client's update to this L2 norm and add Gaussian noise "
                    "to the sum; turns DP on")
    dp.add_argument("--noise-multiplier", type=_non_negative_float, default=None,
                    help="noise stddev over the clip (unset: calibrated to --target-epsilon)")
    dp.add_argument("--target-epsilon", type=_positive_float, default=None,
                    help="the epsilon budget: calibrates the noise for --rounds when "
                    "--noise-multiplier is unset, and the run stops before passing it")
    dp.add_argument("--delta", type=_positive_float, default=None,
                    help="delta of the guarantee (default 1 / N^1.1 for N clients)")
    dev = run.add_argument_group("device heterogeneity and the virtual clock (fs.devices)")
    dev.add_argument("--devices", default=None,
                     help="per-client compute and link speeds: 'lognormal' (phone-class "
                     "defaults, seeded), a CSV (client,example_time_s,download_Bps,"
                     "upload_Bps) or FedScale's device-capacity pickle (.pkl); turns the "
                     "virtual clock on")
    dev.add_argument("--deadline", type=_positive_float, default=None,
                     help="seconds a round waits; later clients are dropped (or, with "
                     "--keep-partial, keep the steps that fit)")
    dev.add_argument("--keep-partial", action="store_true",
                     help="late clients report the local steps that fit before the deadline "
                     "(FedProx's partial work)")
    dev.add_argument("--over-selection", type=_finite_float, default=1.0,
                     help="draw this many times --cohort-size clients and count the first "
                     "--cohort-size to finish (1.3: 30%% more)")
    dev.add_argument("--dropout", type=_non_negative_float, default=0.0,
                     help="each drawn client's chance of never reporting")
    dev.add_argument("--availability", choices=["always", "diurnal"], default="always",
                     help="diurnal: each client is available half of every --day-length, "
                     "from a seeded phase, and cohorts are drawn among the available")
    dev.add_argument("--day-length", type=_positive_float, default=86400.0,
                     help="the diurnal period in virtual seconds")
    attack = run.add_argument_group(
        "attacks: a seeded set of malicious clients, the same share of every cohort")
    attack.add_argument("--attack", choices=ATTACKS, default="none",
                        help="sign_flip: minus the honest update; scaling: the update boosted "
                        "(model replacement); gaussian: N(0, s^2) noise in its place; "
                        "label_flip: labels l -> 9 - l; alie: 'a little is enough' against "
                        "the --aggregator (the pixel backdoor needs images: "
                        "examples/femnist_attacks.py)")
    attack.add_argument("--malicious-fraction", type=_finite_float, default=0.1,
                        help="the malicious share of the population and of each cohort")
    attack.add_argument("--attack-scale", type=_positive_float, default=None,
                        help="sign_flip's scale (default 1), scaling's factor (default the "
                        "cohort size over --server-lr), gaussian's stddev (default 1)")
    rb = run.add_argument_group("robust aggregation (fs.robust): a rule in place of the mean")
    rb.add_argument("--aggregator", choices=ROBUST_AGGREGATORS, default="mean",
                    help="how the clients' updates are combined")
    rb.add_argument("--trim", type=_non_negative_float, default=None,
                    help="trimmed_mean: the fraction dropped at each end, in [0, 0.5) "
                    "(unset: 0.1)")
    rb.add_argument("--krum-f", type=_non_negative_int, default=None,
                    help="krum, multi_krum: the Byzantine clients tolerated, cohort > 2f + 2 "
                    "(unset: 1)")
    rb.add_argument("--krum-m", type=_positive_int, default=None,
                    help="multi_krum: the clients averaged, at most cohort - f (unset: "
                    "cohort - f)")
    rb.add_argument("--norm-bound", type=_positive_float, default=None,
                    help="norm_bound: each update clipped to this L2 norm before the mean "
                    "(unset: 1.0)")
    rb.add_argument("--cc-tau", type=_positive_float, default=None,
                    help="centered_clipping: the clipping radius around the last aggregate "
                    "(unset: 1.0)")
    run.set_defaults(subparser=run)  # errors found after parsing print run's own usage
    return parser


def fresh_output_dir(path: str | Path, overwrite: bool) -> Path:
    """`path`, or the first free `path-2`, `path-3`, ... when `path` holds an earlier run."""
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
    print(f"{path} holds an earlier run (kept); this run goes to {fresh} (--overwrite "
          "replaces it instead)")
    return fresh


def run(args: argparse.Namespace) -> dict:
    if args.algorithm == "fedbuff":
        return run_async(args)
    if args.cohort_size > args.num_clients:  # before generating the data
        raise ValueError(f"--cohort-size {args.cohort_size} is larger than --num-clients "
                         f"{args.num_clients}")
    train, test = data.synthetic(args.alpha, args.beta, num_clients=args.num_clients,
                                 seed=args.seed)
    model = MODELS[args.model](NUM_FEATURES, NUM_CLASSES)
    stages = compression.by_name(args.compression, bits=args.bits,
                                 topk_fraction=args.topk_fraction)
    robust_stages = robust_aggregator(args, stages)  # its flags checked before DP's calibration
    dp = _dp_settings(args, train.num_clients, stages)
    attack = _attack_settings(args, train, test, dp, robust_stages)
    if attack is not None:
        train = attack["train"]
    aggregator = (attack["aggregator"] if attack else dp["aggregator"] if dp
                  else None if robust_stages is None else aggregators.chain(*robust_stages))
    algo = build_algorithm(args, model, aggregator)
    output_dir = (Path(args.output_dir) if args.resume
                  else fresh_output_dir(args.output_dir, args.overwrite))
    print(f"Synthetic({args.alpha:g},{args.beta:g}): train {train}\n  test {test}")
    device_model = build_device_model(args, train.num_clients)
    sampler = dict(cohort_size=args.cohort_size) if dp is None else dict(
        sampler=dp["sampler"], delta=args.delta, target_epsilon=args.target_epsilon)
    if attack is not None and dp is None:
        sampler = dict(sampler=attack["sampler"])
    # A personalization algorithm's clients are evaluated with their own models as they are.
    tune = (evaluation.FineTune(CLIENT_OPTIMIZERS[args.client_optimizer](args.client_lr),
                                args.fine_tune_steps, args.batch_size)
            if args.fine_tune_steps and algo.personal is None else None)
    result = simulate(algo, train, rounds=args.rounds, **sampler, seed=args.seed,
                      eval_data=test, eval_every=args.eval_every, fine_tune=tune,
                      eval_clients=args.eval_clients, eval_rolling=args.eval_rolling,
                      eval_extra=attack["eval_extra"] if attack else None,
                      chunk_size=args.chunk_size, output_dir=output_dir,
                      checkpoint_every=args.checkpoint_every, resume=args.resume,
                      progress=not args.no_progress, devices=device_model)
    final = result.history[-1]
    t = result.timings
    summary = {
        "rounds": args.rounds,
        "seed": args.seed,
        "chunk_size": result.chunk_size,
        "chunk_size_source": result.chunk_size_source,
        "seconds": t,
        "train_loss": final["train_loss"],
        "eval": final["eval"],
        "eval_personal": final.get("eval_personal"),
        "privacy": result.privacy,
        "virtual_time": final.get("virtual_time"),
        "attack": None if attack is None else {
            "attack": args.attack, "aggregator": args.aggregator,
            "malicious_clients": attack["malicious"],
            "success": final.get("attack_success", {}).get("accuracy")},
        "aggregator": args.aggregator,
        "uplink_bits": final["uplink_bits"],
        "downlink_bits": final["downlink_bits"],
    }
    with open(output_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    acc = final["eval"]["accuracy"]
    choice = {"search": f"chunk-size search {t['chunk_size_choice_s']:.1f} s (its compiles "
                        f"included; chose K = {result.chunk_size}, kept for the next run)",
              "cache": f"chunk size {result.chunk_size} from an earlier run's search "
                       f"({t['chunk_size_choice_s']:.1f} s)",
              "given": f"chunk size {result.chunk_size} (given)",
              "checkpoint": f"chunk size {result.chunk_size} (the resumed run's)",
              }[result.chunk_size_source]
    before = [choice] + ([f"compile {t['compile_s']:.1f} s"] if t["compile_s"] else [])
    print(f"\n{args.rounds} rounds in {t['rounds_s']:.1f} s "
          f"({1000 * t['rounds_s'] / args.rounds:.0f} ms a round); before them "
          f"{', '.join(before)}; evaluation {t['eval_s']:.1f} s")
    if result.privacy is not None:
        p = result.privacy
        print(f"user-level DP: epsilon {p['epsilon']:.3g} at delta {p['delta']:.3g} after "
              f"{p['rounds']} rounds (noise multiplier {dp['noise_multiplier']:.4g}, clip "
              f"{args.dp_clip:g}, {p['accountant'].upper()} accountant)")
    if device_model is not None:
        h = result.history
        print(f"virtual clock: {final['virtual_time']:.1f} s of the simulated federation "
              f"({final['virtual_time'] / len(h):.2f} s a round); clients dropped out "
              f"{sum(r['num_dropped'] for r in h)}, late {sum(r['num_late'] for r in h)} "
              f"of {sum(r['num_sampled'] for r in h)} drawn")
    if args.compression != "none":
        print(f"compression {args.compression}: {final['uplink_bits']:,} bits uploaded per "
              f"client, {final['downlink_bits'] / final['uplink_bits']:.1f}x fewer than the "
              f"{final['downlink_bits']:,} of the float32 update")
    evaluated = len(final["eval_clients"]["client_id"])
    print(f"per-client test accuracy over {evaluated} of {test.num_clients} clients "
          "(chance 0.10):")
    personal = algo.personal is not None
    what = "fine-tuning" if not personal else f"{args.algorithm}'s personal model"
    tuned = (f"{args.algorithm}'s personal models:" if personal
             else f"fine-tuned, {args.fine_tune_steps} steps:")
    width = len(tuned) + 1
    print(f"  {'global model:':<{width}}{format_summary(acc)}")
    if "eval_personal" in final:
        own = final["eval_personal"]["accuracy"]
        print(f"  {tuned:<{width}}{format_summary(own)}")
        gain = final["eval_personal_fairness"]
        print(f"  {what} helps {gain['helped']:.0%} of clients, hurts {gain['hurt']:.0%}")
    if attack is not None:
        print(f"attack {args.attack} against the {args.aggregator}: "
              f"{attack['description']}")
        if "attack_success" in final:
            print(f"  attack success {final['attack_success']['accuracy']:.3f} (the share of "
                  "test examples the global model puts in their flipped class)")
    if args.alpha > 0 and acc["p50"] < 0.5 * acc["weighted_mean"]:
        print("  (Synthetic(alpha, beta) draws each client's labels from its own model: one "
              "global model serves the large clients, and the median client needs its own; "
              "see the README)")
    print(f"history: {output_dir}/history.jsonl; rerun exactly with --seed {args.seed} "
          f"--chunk-size {result.chunk_size}")
    return summary


def run_async(args: argparse.Namespace) -> dict:
    """`--algorithm fedbuff`: FedBuff in virtual time, beside synchronous FedAvg's clock for
    as many rounds on the same device model."""
    refused = [flag for flag, value in (("--resume", args.resume), ("--dp-clip", args.dp_clip),
                                        ("--trainable", args.trainable),
                                        ("--attack", args.attack != "none" or None))
               if value not in (None, False)]
    if refused:
        raise ValueError(f"--algorithm fedbuff does not take {', '.join(refused)}")
    m = args.concurrency or args.cohort_size
    if m > args.num_clients:
        raise ValueError(f"--concurrency {m} is larger than --num-clients {args.num_clients}")
    k = args.buffer_size or max(1, m // 10)
    train, test = data.synthetic(args.alpha, args.beta, num_clients=args.num_clients,
                                 seed=args.seed)
    model = MODELS[args.model](NUM_FEATURES, NUM_CLASSES)
    algo = algorithms.fedbuff(
        model, CLIENT_OPTIMIZERS[args.client_optimizer](args.client_lr),
        SERVER_OPTIMIZERS[args.server_optimizer](args.server_lr), buffer_size=k,
        staleness=args.staleness, batch_size=args.batch_size, num_epochs=args.epochs,
        max_examples_per_client=args.max_examples_per_client,
        client_weighting=args.weighting or "num_examples")
    devices = asynchronous.lognormal_devices(train.num_clients, seed=args.seed,
                                             sigma=args.device_spread)
    output_dir = fresh_output_dir(args.output_dir, args.overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"Synthetic({args.alpha:g},{args.beta:g}): train {train}\n  test {test}")
    result = asynchronous.simulate_async(
        algo, train, devices, concurrency=m, num_aggregations=args.rounds, seed=args.seed,
        eval_data=test, eval_every=args.eval_every, eval_clients=args.eval_clients,
        chunk_size=args.chunk_size or 1)
    with open(output_dir / "history.jsonl", "w") as f:
        for record in result.history:
            f.write(json.dumps({k: v for k, v in record.items()
                                if k not in ("clients", "eval_clients")}) + "\n")
    final = result.history[-1]
    fedavg_time = float(asynchronous.fedavg_round_times(
        algo, train, devices, cohort_size=m, rounds=args.rounds, seed=args.seed).sum())
    summary = {"algorithm": "fedbuff", "aggregations": args.rounds, "concurrency": m,
               "buffer_size": k, "staleness": args.staleness, "seed": args.seed,
               "chunk_size": result.chunk_size, "seconds": result.timings,
               "virtual_time": final["virtual_time"],
               "fedavg_virtual_time": fedavg_time,
               "staleness_mean": sum(
                   h["staleness_mean"] for h in result.history) / len(result.history),
               "train_loss": final["train_loss"], "eval": final["eval"]}
    with open(output_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{args.rounds} FedBuff aggregations (K = {k} of M = {m} in flight) in "
          f"{final['virtual_time']:.1f} virtual s; synchronous FedAvg's {args.rounds} rounds "
          f"of {m} would take {fedavg_time:.1f} virtual s on the same devices")
    print(f"mean staleness {summary['staleness_mean']:.2f}; wall "
          f"{result.timings['aggregations_s']:.1f} s (compile {result.timings['compile_s']:.1f} s)")
    print(f"per-client test accuracy over {len(final['eval_clients']['client_id'])} of "
          f"{test.num_clients} clients (chance 0.10):")
    print(f"  global model: {format_summary(final['eval']['accuracy'])}")
    print(f"history: {output_dir}/history.jsonl")
    return summary


def build_algorithm(args: argparse.Namespace, model, aggregator):
    """The algorithm the flags name, with its own hyperparameters from the flags."""
    client = CLIENT_OPTIMIZERS[args.client_optimizer](args.client_lr)
    server = SERVER_OPTIMIZERS[args.server_optimizer](args.server_lr)
    common = dict(batch_size=args.batch_size, num_epochs=args.epochs,
                  client_weighting=args.weighting or ("uniform" if aggregator else
                                                      "num_examples"),
                  aggregator=aggregator)
    if args.trainable is not None and args.algorithm != "fedavg":
        raise ValueError("--trainable is for --algorithm fedavg (FedRep/FedPer take --head)")
    name = args.algorithm
    if name == "fedavg":
        return algorithms.fedavg(model, client, server, trainable=args.trainable,
                                 max_examples_per_client=args.max_examples_per_client,
                                 **common)
    if name == "ditto":
        return algorithms.ditto(model, client, server, lam=args.lam, **common)
    if name == "apfl":
        return algorithms.apfl(model, client, server, alpha=args.apfl_alpha,
                               adaptive_alpha=True, alpha_lr=args.client_lr, **common)
    if name == "pfedme":
        return algorithms.pfedme(model, lam=args.lam, inner_steps=5,
                                 personal_lr=args.client_lr, eta=args.client_lr,
                                 server_optimizer=server, **common)
    if name == "fedrep":
        return algorithms.fedrep(model, client, server, head=args.head,
                                 head_steps=args.head_steps, **common)
    if name in ("hypcluster", "ifca"):
        if aggregator is not None:
            raise ValueError(f"--algorithm {name} takes no DP, compression or --aggregator "
                             "flags (its k models share one sum)")
        return getattr(algorithms, name)(model, client, args.num_clusters, server,
                                         batch_size=args.batch_size, num_epochs=args.epochs)
    return algorithms.fedper(model, client, server, head=args.head, **common)


def build_device_model(args: argparse.Namespace,
                       num_clients: int) -> devices.DeviceModel | None:
    """The device model the flags name (None without --devices)."""
    if args.devices is None:
        given = [f for f, v in (("--deadline", args.deadline is not None),
                                ("--keep-partial", args.keep_partial),
                                ("--over-selection", args.over_selection != 1.0),
                                ("--dropout", args.dropout != 0.0),
                                ("--availability", args.availability != "always")) if v]
        if given:
            raise ValueError(f"{given[0]} needs --devices (the clients' speeds)")
        return None
    source = args.devices
    if source == "lognormal":
        profiles = devices.Devices.sample(num_clients, args.seed)
    elif source.endswith(".csv"):
        profiles = devices.Devices.from_csv(source)
    elif source.endswith(".pkl"):
        profiles = devices.Devices.from_fedscale(source, num_clients, args.seed)
    else:
        raise ValueError(f"--devices must be 'lognormal', a .csv or a FedScale .pkl file, got "
                         f"{source!r}")
    availability = (devices.diurnal(num_clients, args.seed, period=args.day_length)
                    if args.availability == "diurnal" else None)
    return devices.DeviceModel(profiles, deadline=args.deadline,
                               over_selection=args.over_selection, dropout=args.dropout,
                               availability=availability, keep_partial=args.keep_partial)


# Each rule's own flags: one given with another --aggregator is refused, not ignored.
ROBUST_FLAGS = {"trim": ("trimmed_mean",), "krum_f": ("krum", "multi_krum"),
                "krum_m": ("multi_krum",), "norm_bound": ("norm_bound",),
                "cc_tau": ("centered_clipping",)}


def robust_aggregator(args: argparse.Namespace, stages=()) -> tuple | None:
    """The --aggregator rule's chain stages, clients weighted by --weighting (default example
    counts; the order statistics and Krum count each client once whatever the weights), with
    the compression `stages` before the rule; None for the plain uncompressed mean. Stages,
    not a chain, so an attack can go first or wrap the rule."""
    name = args.aggregator
    for dest, rules in ROBUST_FLAGS.items():
        if getattr(args, dest) is not None and name not in rules:
            raise ValueError(f"--{dest.replace('_', '-')} is for --aggregator "
                             f"{' or '.join(rules)}, not {name}")
    weighting = aggregators.weight_by(args.weighting or "num_examples")
    if name == "mean":
        return (weighting, *stages, aggregators.mean()) if stages else None
    if args.dp_clip is not None:
        raise ValueError(f"--aggregator {name} replaces the mean DP-FedAvg noises: give "
                         "--dp-clip without it")
    or_default = lambda value, default: default if value is None else value
    if name == "norm_bound":
        return (robust.norm_bound(or_default(args.norm_bound, 1.0)), weighting, *stages,
                aggregators.mean())
    rule = {"median": robust.median,
            "trimmed_mean": lambda: robust.trimmed_mean(or_default(args.trim, 0.1)),
            "krum": lambda: robust.krum(or_default(args.krum_f, 1)),
            "multi_krum": lambda: robust.multi_krum(or_default(args.krum_f, 1), args.krum_m),
            "geometric_median": robust.geometric_median,
            "centered_clipping": lambda: robust.centered_clipping(or_default(args.cc_tau, 1.0)),
            }[name]()
    return (weighting, *stages, rule)


def _dp_settings(args: argparse.Namespace, num_clients: int, stages=()) -> dict | None:
    """DP-FedAvg's chain (with the compression `stages` after the clip) and Poisson sampler
    from the flags (None when DP is off), the noise calibrated to the target epsilon when not
    given."""
    if args.dp_clip is None:
        given = [f for f, v in (("--noise-multiplier", args.noise_multiplier),
                                ("--target-epsilon", args.target_epsilon),
                                ("--delta", args.delta)) if v is not None]
        if given:
            raise ValueError(f"{given[0]} needs --dp-clip (the clip norm of DP-FedAvg)")
        return None
    z = args.noise_multiplier
    if z is None:
        if args.target_epsilon is None:
            raise ValueError("--dp-clip needs --noise-multiplier or --target-epsilon")
        delta = privacy.default_delta(num_clients) if args.delta is None else args.delta
        z = privacy.noise_multiplier_for(args.target_epsilon, args.cohort_size / num_clients,
                                         args.rounds, delta, accountant="rdp")
        print(f"noise multiplier {z:.4g}: epsilon {args.target_epsilon:g} at delta "
              f"{delta:.3g} after {args.rounds} rounds")
    stages = (aggregators.clip(args.dp_clip), aggregators.weight_by(args.weighting or "uniform"),
              *stages, aggregators.dp_mean(z, args.dp_clip, args.cohort_size))
    return {"aggregator": aggregators.chain(*stages), "stages": stages, "noise_multiplier": z,
            "sampler": sampling.poisson(num_clients, args.cohort_size)}


def _attack_settings(args: argparse.Namespace, train, test, dp: dict | None,
                     rule: tuple | None) -> dict | None:
    """The attack's chain (in front of, or for ALIE around, the `rule` stages or DP's), its
    exact-share sampler, the (poisoned) training data and the success set from the flags
    (None without an attack)."""
    if args.attack == "none":
        return None
    if not 0 <= args.malicious_fraction <= 1:
        raise ValueError(f"--malicious-fraction must be in [0, 1], got "
                         f"{args.malicious_fraction:g}")
    fraction = args.malicious_fraction
    adversary = attacks.Adversary.choose(train.num_clients, fraction, seed=args.seed)
    m = round(fraction * args.cohort_size)
    sampler = adversary.sampler(args.cohort_size, m)  # raises when m is too many
    scale = args.attack_scale
    update = {
        "sign_flip": lambda: attacks.sign_flip(adversary, scale or 1.0),
        "scaling": lambda: attacks.scaling(adversary,
                                           scale or args.cohort_size / args.server_lr),
        "gaussian": lambda: attacks.gaussian(adversary, scale or 1.0),
    }.get(args.attack)
    stages = list(dp["stages"] if dp is not None else rule if rule is not None else
                  (aggregators.weight_by(args.weighting or "num_examples"), aggregators.mean()))
    if args.attack == "alie":
        stages[-1] = attacks.alie(adversary, stages[-1])
    first = [update(), aggregators.mask_nonfinite()] if update else []
    extra, poisoned = None, train
    if args.attack == "label_flip":
        flip = attacks.label_flip(NUM_CLASSES)
        poisoned = attacks.poison(train, adversary, flip, seed=args.seed)
        extra = {"attack_success": flip.success_data(test)}
    where = ("each cohort's malicious are whichever Poisson sampling draws" if dp is not None
             else f"{m} of the {args.cohort_size} clients of each round malicious")
    return {"aggregator": aggregators.chain(*first, *stages), "sampler": sampler,
            "train": poisoned, "eval_extra": extra,
            "malicious": adversary.malicious.tolist(),
            "description": f"{len(adversary.malicious)} of {train.num_clients} clients "
                           f"malicious, {where}"}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # dp-accounting logs each RDP order it drops as inexact; the bound stays valid without it.
    logging.getLogger("absl").setLevel(logging.ERROR)
    if args.command == "run":
        try:
            run(args)
        except (ValueError, TypeError) as e:  # a bad combination of flags: say which, not where
            args.subparser.error(str(e))
        except DivergedError as e:
            print(f"fedjax-sim run: error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
