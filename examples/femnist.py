"""FedAvg (or FedAdam) on FEMNIST-105 (105 real LEAF writers) with the EMNIST CNN of Reddi et
al. (2021); prints the per-client test accuracy distribution as training goes.

    .venv/bin/python examples/femnist.py [--rounds 75] [--server adam]

Defaults follow the plain FedAvg setup: 20 clients per round, 1 local epoch, batch 20, client
SGD 0.1, server SGD 1.0. The data set is read from ../shared/data/femnist_leaf by default
(`--path` for another copy of the .npz).
"""

import argparse
import time

import optax

import fedjax_sim as fs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=None)
    parser.add_argument("--rounds", type=int, default=75)
    parser.add_argument("--cohort", type=int, default=20)
    parser.add_argument("--server", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--client-lr", type=float, default=0.1)
    parser.add_argument("--server-lr", type=float, default=None,
                        help="default 1.0 for sgd, 0.001 for adam")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train, test = fs.data.femnist(args.path)
    print(f"train {train}\ntest  {test}")
    if args.server == "sgd":
        server = optax.sgd(1.0 if args.server_lr is None else args.server_lr)
    else:
        server = fs.algorithms.fedadam(1e-3 if args.server_lr is None else args.server_lr)
    model = fs.models.emnist_cnn()
    algo = fs.algorithms.fedavg(model, optax.sgd(args.client_lr), server, batch_size=20,
                                num_epochs=1)
    start = time.perf_counter()
    result = fs.simulate(algo, train, rounds=args.rounds, cohort_size=args.cohort,
                         seed=args.seed, eval_data=test, eval_every=args.eval_every,
                         chunk_size=args.chunk_size)
    wall = time.perf_counter() - start
    for record in result.history:
        if "eval" in record:
            print(f"round {record['round'] + 1:4d}: test accuracy per writer: "
                  f"{fs.evaluation.format_summary(record['eval']['accuracy'])}")
    print(f"{args.rounds} rounds in {wall:.0f} s ({wall / args.rounds:.2f} s/round, chunk size "
          f"{result.chunk_size}); pooled test accuracy "
          f"{fs.evaluate_pooled(model, result.params, test)['accuracy']:.3f}")


if __name__ == "__main__":
    main()
