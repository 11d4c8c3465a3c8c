"""A run that a test can stop with a signal and resume: SCAFFOLD on 60 clients (a client
store of 60 x 18k floats, so that writing a checkpoint takes most of each round), a
checkpoint every round, the final params and client store saved to OUT_DIR/final.npz.

  python tests/simulation_worker.py OUT_DIR ROUNDS [--resume]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def build():
    import fedjax_sim as fs

    rng = np.random.default_rng(0)
    sizes = rng.integers(3, 12, 60)
    clients = {f"c{i}": {"x": rng.normal(size=(n, 6)).astype(np.float32),
                         "y": rng.integers(0, 3, n).astype(np.int32)}
               for i, n in enumerate(sizes)}
    data = fs.data.from_client_dict(clients)
    algo = fs.algorithms.scaffold(fs.models.mlp(6, 3, hidden=(2000,)), 0.1, batch_size=4)
    return data, algo


def run(out_dir: Path, rounds: int, *, resume: bool = False, checkpoint_every: int = 1):
    import fedjax_sim as fs

    data, algo = build()
    return fs.simulate(algo, data, rounds=rounds, cohort_size=4, seed=3, chunk_size=2,
                       output_dir=out_dir, checkpoint_every=checkpoint_every, resume=resume,
                       progress=False)


def flat(result) -> dict[str, np.ndarray]:
    import jax

    out = {f"params{jax.tree_util.keystr(p)}": np.asarray(x)
           for p, x in jax.tree_util.tree_flatten_with_path(result.params)[0]}
    out.update({f"store{jax.tree_util.keystr(p)}": np.asarray(x)
                for p, x in jax.tree_util.tree_flatten_with_path(result.store)[0]})
    out["train_loss"] = np.array([h["train_loss"] for h in result.history])
    return out


def main(argv: list[str]) -> None:
    out_dir, rounds = Path(argv[0]), int(argv[1])
    result = run(out_dir, rounds, resume="--resume" in argv)
    np.savez(out_dir / "final.npz", **flat(result))


if __name__ == "__main__":
    main(sys.argv[1:])
