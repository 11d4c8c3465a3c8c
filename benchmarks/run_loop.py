"""The per-client-jit Python loop (FedJAX's execution pattern, `loop.py`) over the same Flax
models as fedjax_sim, on one benchmark workload: prints one RESULT line (see workloads.py).

  python benchmarks/run_loop.py --workload W1 --cohort 100
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from loop import LoopFedAvg  # noqa: E402
from run_fedjax_sim import build_model  # noqa: E402
from workloads import (  # noqa: E402
    SEED,
    WORKLOADS,
    client_data,
    driver_parser,
    result_line,
    split_clients,
    time_rounds,
)


def main(argv=None) -> None:
    args = driver_parser(__doc__.split("\n")[0]).parse_args(argv)
    w = WORKLOADS[args.workload]
    x, y = client_data(w, args.cohort)
    clients = [{"x": cx, "y": cy} for cx, cy in split_clients(w, x, y)]
    model = build_model(w)
    loop = LoopFedAvg(model, optax.sgd(w.client_lr), optax.sgd(w.server_lr),
                      batch_size=w.batch_size, num_epochs=w.epochs)
    params, opt_state = loop.init(model.init(jax.random.key(SEED)))
    compile_s = loop.compile(params, {k: v[:w.batch_size] for k, v in clients[0].items()})
    rng = np.random.default_rng(SEED)
    box = {"state": (params, opt_state)}

    def run_round():
        box["state"] = jax.block_until_ready(loop.round(*box["state"], clients, rng))

    timing = time_rounds(run_round, args.rounds, min_seconds=args.min_seconds)
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(box["state"][0])), "diverged"
    result_line({"system": "loop", "workload": w.name, "cohort": args.cohort, **timing,
                 "compile_s": compile_s, "jax_version": jax.__version__})


if __name__ == "__main__":
    main()
