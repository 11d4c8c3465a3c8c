"""One process of a multi-process (multi-host) simulation, and the run it shares with the tests.

`python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR` joins a
`jax.distributed` job on 127.0.0.1:PORT with one CPU device per process (gloo collectives),
runs `run(fs.client_mesh())` over the global devices and writes `summarize(result)` to
OUT_DIR/process_PROCESS_ID.npz. tests/test_distributed.py runs the same `run` in one process.

Everything that touches jax lives in functions: importing this module (as the tests do) must
not configure jax or start its backend.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

NUM_CLIENTS = 40
MAX_EXAMPLES = 60


def run(mesh, *, cohort_size: int = 8, chunk_size: int = 1, rounds: int = 3,
        resident: bool = True, evaluate: bool = True, algorithm: str = "fedavg"):
    """FedAvg (or SCAFFOLD, whose client store is split over the processes' devices) on a
    small MLP and 40 synthetic clients; returns the `SimulationResult`."""
    import optax

    import fedjax_sim as fs

    train, test = fs.data.synthetic(num_clients=NUM_CLIENTS, max_examples_per_client=MAX_EXAMPLES,
                                    seed=0)
    model = fs.models.mlp(train.features["x"].shape[1], 10, hidden=(16,))
    algo = (fs.algorithms.scaffold(model, 0.1, batch_size=10) if algorithm == "scaffold"
            else fs.algorithms.fedavg(model, optax.sgd(0.1), batch_size=10))
    return fs.simulate(algo, train, rounds=rounds, cohort_size=cohort_size, seed=0,
                       chunk_size=chunk_size, mesh=mesh, resident=resident,
                       eval_data=test if evaluate else None, eval_every=2 if evaluate else 0,
                       progress=False)


def summarize(result) -> dict[str, np.ndarray]:
    """What the runs are compared on: the final params, every round's train loss and per-client
    train losses (by client id), and the per-client metrics of every evaluation."""
    import jax

    out = {f"param{jax.tree_util.keystr(path)}": np.asarray(leaf)
           for path, leaf in jax.tree_util.tree_flatten_with_path(result.params)[0]}
    out["train_loss"] = np.array([h["train_loss"] for h in result.history])
    for h in result.history:
        r = h["round"]
        by_id = np.argsort(h["clients"]["client_id"])
        out[f"round{r}/client_id"] = np.asarray(h["clients"]["client_id"])[by_id]
        out[f"round{r}/client_train_loss"] = np.asarray(h["clients"]["train_loss"])[by_id]
        for k, v in h.get("eval_clients", {}).items():
            out[f"round{r}/eval/{k}"] = np.asarray(v)
    return out


def main(argv: list[str]) -> None:
    process_id, num_processes, port, out_dir = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    import jax

    # Before any other jax use. One CPU device per process: with two, the first cross-process
    # collective hung (jax 0.10, gloo).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 1)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id)
    assert jax.process_count() == num_processes and len(jax.devices()) == num_processes

    import fedjax_sim as fs

    mesh = fs.client_mesh()
    summary = summarize(run(mesh))
    # The vectorization width chosen by timing (chunk_size=None) must be the same everywhere.
    summary["auto_chunk_size"] = np.array(run(mesh, chunk_size=None, rounds=1,
                                              evaluate=False).chunk_size)
    summary.update({f"scaffold/{k}": v for k, v in
                    summarize(run(mesh, algorithm="scaffold", evaluate=False)).items()})
    np.savez(Path(out_dir) / f"process_{process_id}.npz", **summary)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
