"""The device's limits, measured with JAX: f32 matmul rate and memory bandwidth.

  python benchmarks/limits.py [--quick] [--info-only]    # prints one JSON line

The suite runs this in a child process (`suite.measure_device`), never in its own: a process
that opens a GPU with JAX holds most of its memory (JAX's allocator reserves 75% up front)
until it exits, which would leave the drivers the suite starts too little.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import time_rounds  # noqa: E402


def device_info() -> dict:
    """What the default device is (what `suite.machine_name` needs), without measuring it."""
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "jax_version": jax.__version__}


def measure(quick: bool) -> dict:
    """f32 matmul rate (best of several square sizes) and memory bandwidth (the read rate of
    a sum over an array far larger than the caches), measured on the default device.
    (An elementwise op that writes a fresh output measures page faults on a CPU, not memory.)"""
    def best_time(f, *args, repeats):
        return time_rounds(lambda: jax.block_until_ready(f(*args)), repeats)["s_per_round_min"]

    gpu = jax.devices()[0].platform != "cpu"
    sizes = (4096, 8192) if gpu else (1024, 2048)
    rates = {}
    for n in sizes:
        reps = 8 if gpu else 2
        rng = np.random.default_rng(0)
        a = jnp.asarray(rng.standard_normal((reps, n, n), dtype=np.float32))
        b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
        f = jax.jit(lambda a, b: lax.map(lambda x: x @ b, a))
        s = best_time(f, a, b, repeats=3 if quick else 5)
        rates[f"{n}^3"] = reps * 2 * n**3 / s / 1e9
    size = 2**30 // 4 if gpu else 2**28 // 4       # 1 GB on a GPU, 256 MB on a CPU
    x = jnp.ones((size,), jnp.float32)
    s = best_time(jax.jit(jnp.sum), x, repeats=5 if quick else 10)
    return {"matmul_gflops": {k: round(v, 1) for k, v in rates.items()},
            "peak_gflops": round(max(rates.values()), 1),
            "bandwidth_gbs": round(size * 4 / s / 1e9, 1), **device_info()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--info-only", action="store_true", help="name the device, measure nothing")
    args = p.parse_args(argv)
    print(json.dumps(device_info() if args.info_only else measure(args.quick)), flush=True)


if __name__ == "__main__":
    main()
