"""Seconds per round of the privacy mechanisms against FedAvg, side by side (issue 17's speed).

W1 (MLP 784-200-10, 64 examples a client, batch 16, one epoch) at 1,000 clients, every client
in every round, one chunk size K for all. The systems, each one `fs.Simulation` through the
public API:
  fedavg         uniform weights, the plain mean
  dp_fedavg      clip + uniform weights + dp_mean (Gaussian noise on the sum, fixed W)
  adaptive_dp    adaptive quantile clipping (aggregators.adaptive_dp_mean)
  secagg         secure aggregation (fs.secagg: clip, stochastic rounding into Z_2^32, the
                 modular sum; masks, which cancel exactly, not generated)
  dp_ftrl_*      DP-FTRL's correlated noise (fs.dp_ftrl: tree, banded, BLT; built for 1,000
                 rounds of clients 10 rounds apart), generated on the server once a round.
All are compiled first; then a warm-up round of each, then the timed rounds interleaved (one
round of each system in turn), so load from other processes falls on all alike; `s/round` is
the median, `ratio` the system's over fedavg's.

  python benchmarks/privacy.py            # ~3 min on a 2-core CPU
  python benchmarks/privacy.py --quick    # 200 clients, 3 timed rounds

Writes `benchmarks/results/privacy-<machine>.json` and `.md`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core import machine_name  # noqa: E402
from run_fedjax_sim import build, build_model, interleaved_rounds, no_caches  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

import fedjax_sim as fs  # noqa: E402

A = fs.aggregators
CLIP, NOISE, SEPARATION = 1.0, 1.0, 10


def chains(cohort: int) -> dict:
    """Each system's aggregation chain (those the library has)."""
    out = {
        "fedavg": A.chain(A.weight_by("uniform"), A.mean()),
        "dp_fedavg": A.chain(A.clip(CLIP), A.weight_by("uniform"),
                             A.dp_mean(NOISE, CLIP, cohort)),
        "adaptive_dp": A.chain(A.weight_by("uniform"), A.adaptive_dp_mean(NOISE, cohort)),
    }
    out["secagg"] = A.chain(A.weight_by("uniform"), fs.secagg.secagg(CLIP, cohort))
    for kind in ("tree", "banded", "blt"):  # built for 1,000 rounds, clients 10 apart
        mech = fs.dp_ftrl.mechanism(kind, 1000, SEPARATION)
        out[f"dp_ftrl_{kind}"] = A.chain(A.clip(CLIP), A.weight_by("uniform"),
                                         fs.dp_ftrl.dp_ftrl_mean(NOISE, CLIP, cohort, mech))
    return out


def every_client(cohort: int) -> fs.sampling.Sampler:
    """The whole population every round, declared to the accountant as a cycle of
    `SEPARATION` cohorts so that DP-FTRL's mechanisms (built for that separation) accept it:
    what is timed is the round, not the accounting."""
    return fs.sampling.Sampler(lambda seed, r: np.arange(cohort), cohort, f"all({cohort})",
                               fs.sampling.Participation("cyclic", SEPARATION * cohort, cohort))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per system")
    args = parser.parse_args()
    no_caches()
    w = WORKLOADS["W1"]
    cohort = 200 if args.quick else 1000
    rounds = args.rounds or (3 if args.quick else 21)
    _, train = build(w, cohort)
    algorithms = {name: fs.algorithms.fedavg(build_model(w), optax.sgd(w.client_lr),
                                             optax.sgd(w.server_lr), batch_size=w.batch_size,
                                             num_epochs=w.epochs, aggregator=chain)
                  for name, chain in chains(cohort).items()}
    rows = interleaved_rounds(algorithms, train, every_client(cohort), args.chunk_size, rounds)
    human, slug = machine_name()
    out = Path(__file__).resolve().parent / "results" / (
        f"privacy-{slug}{'-quick' if args.quick else ''}")
    meta = {"machine": human, "date": dt.date.today().isoformat(), "jax": jax.__version__,
            "workload": f"W1, {cohort} clients, all every round, K={args.chunk_size}",
            "clip": CLIP, "noise_multiplier": NOISE}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Privacy mechanisms against FedAvg: {meta['workload']}", "",
             f"{human}, {meta['date']}, jax {jax.__version__}; median of {rounds} interleaved "
             "rounds.", "", "| system | s/round | ratio to fedavg | compile s |",
             "|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['s_per_round']:.3f} | {r['ratio']:.2f} | "
              f"{r['compile_s']:.1f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
