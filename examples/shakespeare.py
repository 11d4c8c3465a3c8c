"""FedAvg on Shakespeare by speaking role (Tiny Shakespeare, the LEAF/FedJAX way) with the
char-LSTM (embedding 8, two LSTM layers of 256); prints the per-role test accuracy of the next
character (PAD excluded, as TFF and Reddi et al. count it).

    .venv/bin/python examples/shakespeare.py [--rounds 300]

Defaults follow Reddi et al. (2021) / FedJAX's FedAvg baseline: 10 roles per round, batch 4,
1 local epoch, client SGD 1.0, server SGD 1.0; `--max-steps` caps a role's local steps per
round (the longest roles have ~100 batches).
"""

import argparse
import time

import optax

import fedjax_sim as fs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=None)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--cohort", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--client-lr", type=float, default=1.0)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-clients", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train, test = fs.data.shakespeare(args.path)
    print(f"train {train}\ntest  {test}")
    model = fs.models.char_lstm()
    algo = fs.algorithms.fedavg(model, optax.sgd(args.client_lr), optax.sgd(args.server_lr),
                                batch_size=args.batch_size, num_epochs=1,
                                max_steps=args.max_steps)
    start = time.perf_counter()
    result = fs.simulate(algo, train, rounds=args.rounds, cohort_size=args.cohort,
                         seed=args.seed, eval_data=test, eval_every=args.eval_every,
                         eval_clients=args.eval_clients, chunk_size=args.chunk_size)
    wall = time.perf_counter() - start
    for record in result.history:
        if "eval" in record:
            print(f"round {record['round'] + 1:4d}: test accuracy per role: "
                  f"{fs.evaluation.format_summary(record['eval']['accuracy'])}")
    print(f"{args.rounds} rounds in {wall:.0f} s ({wall / args.rounds:.2f} s/round, chunk size "
          f"{result.chunk_size})")


if __name__ == "__main__":
    main()
