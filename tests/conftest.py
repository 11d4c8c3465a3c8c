"""Test setup: 8 CPU devices so sharding is exercised without accelerators, and a fresh
chunk-size cache (subprocesses inherit it), so no test reads or fills the user's own."""

import os
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)
os.environ["FEDJAX_SIM_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedjax_sim-test-cache-")
