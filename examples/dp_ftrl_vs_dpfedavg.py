"""DP-FTRL's correlated noise against DP-FedAvg's independent noise at the same (epsilon,
delta): test accuracy on a synthetic population.

    PYTHONPATH=. .venv/bin/python examples/dp_ftrl_vs_dpfedavg.py [--epsilon 0.25] [--rounds 200]

Every method clips each client's update to `--clip` and releases the sum of a cohort with
Gaussian noise, calibrated by the PLD accountant to the same epsilon at delta = N^-1.1:
- DP-FedAvg, Poisson sampling (McMahan et al. 2018): amplified by subsampling.
- DP-FedAvg, cyclic participation: the same cohorts as DP-FTRL's, no amplification.
- DP-FTRL with tree aggregation restarted each cycle (Kairouz et al. 2021), the banded
  Toeplitz strategy (Choquette-Choo et al. 2023) and the BLT (McKenna 2024), all under
  cyclic participation: each client once every N / cohort rounds, `rounds / (N / cohort)`
  times. The correlated noise cancels in the running sum the server's SGD follows.
The population is FedProx's Synthetic IID, 40 examples per client; the model a
logistic regression; clients run one epoch of SGD; the server an SGD step on the noised mean.
Takes about 2 minutes on a 2-core CPU (the BLT's optimization is 20 s of it).

With the defaults (2,000 clients, cohorts of 50: each client 5 times, 40 rounds apart;
epsilon 0.25), two seeds, test accuracy: DP-FedAvg under cyclic participation 0.503, DP-FTRL
tree 0.539, banded 0.557, BLT 0.557; Poisson-sampled DP-FedAvg 0.559 and the noiseless
clipped run 0.561. Correlated noise recovers what independent noise loses under the same
participation, as Kairouz et al. report, and comes within seed noise of the amplified run,
whose Poisson sampling a real federation rarely guarantees.
"""

import argparse
import math
import time

import dp_accounting
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim import aggregators as agg


def run(train, test, sampler, noise_stage, args, seed):
    chain = agg.chain(agg.clip(args.clip), agg.weight_by("uniform"), noise_stage)
    model = (fs.models.logistic_regression(60, 10) if args.hidden == 0 else
             fs.models.mlp(60, 10, (args.hidden,)))
    algo = fs.algorithms.fedavg(model, optax.sgd(args.client_lr), optax.sgd(args.server_lr),
                                batch_size=10, aggregator=chain)
    result = fs.simulate(algo, train, rounds=args.rounds, sampler=sampler, seed=seed,
                         eval_data=test, chunk_size=args.chunk_size, progress=False)
    final = result.history[-1]["eval"]
    return final["accuracy"]["weighted_mean"], final["loss"]["weighted_mean"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=0.25)
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--cohort", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clip", type=float, default=0.05)
    parser.add_argument("--client-lr", type=float, default=0.05)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--hidden", type=int, default=0, help="an MLP's width; 0: logistic")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=10)
    args = parser.parse_args()
    n, size, rounds = args.clients, args.cohort, args.rounds
    train, test = fs.data.synthetic(num_clients=n, iid=True, num_examples=40, seed=0)
    delta = fs.privacy.default_delta(n)
    cyclic = fs.sampling.cyclic(n, size)
    separation = n // size
    print(f"{n} clients, cohorts of {size}, {rounds} rounds: each client "
          f"{math.ceil(rounds / separation)} times, {separation} rounds apart; epsilon "
          f"{args.epsilon:g} at delta {delta:.2g}")

    z_poisson = fs.privacy.noise_multiplier_for(args.epsilon, size / n, rounds, delta)
    z_cyclic = dp_accounting.calibrate_dp_mechanism(
        dp_accounting.pld.PLDAccountant,
        lambda z: fs.privacy.gaussian_event(z, cyclic.participation, rounds), args.epsilon,
        delta)
    methods = {"DP-FedAvg, Poisson": (fs.sampling.poisson(n, size),
                                      agg.dp_mean(z_poisson, args.clip, size), z_poisson),
               "DP-FedAvg, cyclic": (cyclic, agg.dp_mean(z_cyclic, args.clip, size), z_cyclic)}
    for kind in ("tree", "banded", "blt"):
        mech = fs.dp_ftrl.mechanism(kind, rounds, separation)
        z = fs.dp_ftrl.noise_multiplier_for(mech, args.epsilon, cyclic.participation, rounds,
                                            delta)
        methods[f"DP-FTRL, {kind}"] = (cyclic, fs.dp_ftrl.dp_ftrl_mean(z, args.clip, size, mech),
                                       z)
    nonprivate = agg.dp_mean(0.0, args.clip, size)
    methods["no noise (clipped), cyclic"] = (cyclic, nonprivate, 0.0)

    for name, (sampler, stage, z) in methods.items():
        t = time.perf_counter()
        accuracy, loss = zip(*[run(train, test, sampler, stage, args, seed)
                               for seed in range(args.seeds)], strict=True)
        print(f"{name:28s} noise multiplier {z:6.3f}  test accuracy {np.mean(accuracy):.4f} "
              f"(seeds {', '.join(f'{a:.4f}' for a in accuracy)}), loss {np.mean(loss):.4f}; "
              f"{time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
