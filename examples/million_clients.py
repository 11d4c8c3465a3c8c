"""A population of a million clients, a few examples each: sampled and trained for a few rounds.

FederatedData holds the population as flat columns plus offsets (no per-client Python objects),
and each round packs only its cohort. Prints seconds per round and the peak host memory.

    .venv/bin/python examples/million_clients.py [--clients 1000000] [--rounds 5] [--streamed]

With --streamed the population is written to memory-mapped .npy files and read per cohort.
"""

import argparse
import resource
import tempfile
import time

import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim.data.storage import load_npy, save_npy


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1_000_000)
    parser.add_argument("--examples", type=int, default=6, help="per client, before the split")
    parser.add_argument("--cohort", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streamed", action="store_true")
    args = parser.parse_args()

    t = time.perf_counter()
    train, test = fs.data.synthetic(1.0, 1.0, num_clients=args.clients,
                                    num_examples=args.examples, seed=0)
    print(f"generated {train} in {time.perf_counter() - t:.1f} s; "
          f"peak RSS {peak_rss_mb():.0f} MB")
    with tempfile.TemporaryDirectory() as tmp:
        if args.streamed:
            train = load_npy(save_npy(train, tmp))
            print(f"memory-mapped from {tmp}")
        algo = fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.05),
                                    batch_size=5)
        t = time.perf_counter()
        result = fs.simulate(algo, train, rounds=args.rounds, cohort_size=args.cohort,
                             chunk_size=8, seed=0, eval_data=test, eval_clients=10_000,
                             progress=False)
        wall = time.perf_counter() - t
    times = np.diff([0.0] + [h["wall_time"] for h in result.history])
    acc = result.history[-1]["eval"]["accuracy"]
    print(f"{args.rounds} rounds of {args.cohort} clients in {wall:.1f} s "
          f"(median {np.median(times[1:]) if len(times) > 1 else times[0]:.3f} s/round after "
          f"the first); test accuracy on 10,000 clients: weighted {acc['weighted_mean']:.3f}")
    print(f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
