"""The device's limits, measured with JAX: f32 matmul rate and memory bandwidth.

  python benchmarks/limits.py [--quick] [--info-only]    # prints one JSON line

The suite runs this in a child process (`suite.probe_device`), never in its own: a process
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


def matmul_rate(m: int, k: int, n: int, target_flops: float, repeats: int) -> float:
    """GFLOP/s of an f32 [m,k] @ [k,n] matmul: `target_flops` / (2mkn) different left operands
    through one jitted `lax.map` (so per-call dispatch is not counted), best of `repeats`."""
    flops = 2 * m * k * n
    reps = max(1, int(target_flops // flops))
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((reps, m, k), dtype=np.float32))
    b = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32))
    f = jax.jit(lambda a, b: lax.map(lambda x: x @ b, a))
    best = time_rounds(lambda: jax.block_until_ready(f(a, b)), repeats)["s_per_round_min"]
    return reps * flops / best / 1e9


def measure(quick: bool) -> dict:
    """f32 matmul rate (best of several square sizes) and memory bandwidth (the read rate of
    a sum over an array far larger than the caches), measured on the default device.
    (An elementwise op that writes a fresh output measures page faults on a CPU, not memory.)"""
    gpu = jax.devices()[0].platform != "cpu"
    reps = 8 if gpu else 2
    rates = {f"{n}^3": matmul_rate(n, n, n, target_flops=reps * 2 * n**3,
                                   repeats=3 if quick else 5)
             for n in ((4096, 8192) if gpu else (1024, 2048))}
    size = 2**30 // 4 if gpu else 2**28 // 4       # 1 GB on a GPU, 256 MB on a CPU
    x, total = jnp.ones((size,), jnp.float32), jax.jit(jnp.sum)
    s = time_rounds(lambda: jax.block_until_ready(total(x)), 5 if quick else 10)["s_per_round_min"]
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
