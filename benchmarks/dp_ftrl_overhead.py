"""A DP-FTRL round against FedAvg's and DP-FedAvg's on W1 (MLP 784-200-10, 64 examples per
client, batch 16, one epoch), interleaved in one process, fastest and median of the timed
rounds per configuration.

    PYTHONPATH=. .venv/bin/python benchmarks/dp_ftrl_overhead.py [--clients 1000] [--devices 2]

The mechanisms are built for 1,000 rounds of clients 10 rounds apart (the tree 4 levels deep,
10 bands, the BLT jax-privacy optimizes); their noise is generated on the server once a round.
"""

import argparse
import time

import jax
import numpy as np
import optax

import fedjax_sim as fs
from fedjax_sim import aggregators as agg


def population(num_clients: int) -> fs.data.FederatedData:
    rng = np.random.default_rng(0)
    n = 64 * num_clients
    return fs.data.from_arrays(np.repeat(np.arange(num_clients), 64),
                               {"x": rng.standard_normal((n, 784)).astype(np.float32),
                                "y": rng.integers(0, 10, n).astype(np.int32)})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--devices", type=int, default=1, help="CPU devices (a mesh if > 1)")
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)
    mesh = fs.client_mesh() if args.devices > 1 else None
    train, model = population(args.clients), fs.models.mlp(784, 10)
    n = args.clients
    chains = {"fedavg": agg.default("uniform"),
              "dp_fedavg": agg.chain(agg.clip(1.0), agg.weight_by("uniform"),
                                     agg.dp_mean(1.0, 1.0, n))}
    for kind in ("tree", "banded", "blt"):
        t = time.perf_counter()
        mech = fs.dp_ftrl.mechanism(kind, 1000, 10)
        print(f"{kind}: built in {time.perf_counter() - t:.1f} s")
        chains[f"dp_ftrl_{kind}"] = agg.chain(agg.clip(1.0), agg.weight_by("uniform"),
                                              fs.dp_ftrl.dp_ftrl_mean(1.0, 1.0, n, mech))
    sims = {}
    for name, chain in chains.items():
        algo = fs.algorithms.fedavg(model, optax.sgd(0.1), optax.sgd(1.0), batch_size=16,
                                    aggregator=chain)
        sim = fs.Simulation(algo, train, cohort_size=n, chunk_size=args.chunk_size,
                            mesh=mesh, progress=False)
        sim.step()  # compiles
        sims[name] = sim
    times = {name: [] for name in sims}
    for _ in range(args.repeats):  # interleaved: drift from other tenants hits all alike
        for name, sim in sims.items():
            packed = sim.pack(sim.round)
            t = time.perf_counter()
            sim.state, sim.store, metrics = sim.runner(sim.state, sim.store, packed)
            jax.block_until_ready((sim.state, metrics))
            times[name].append(time.perf_counter() - t)
            sim.round += 1
    base = min(times["fedavg"])
    for name, ts in times.items():
        print(f"{name:16s} fastest {min(ts):.3f} s  median {np.median(ts):.3f} s  "
              f"fastest / FedAvg's {min(ts) / base:.3f}")


if __name__ == "__main__":
    main()
