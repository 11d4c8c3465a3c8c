"""Test setup: 8 CPU devices so sharding is exercised without accelerators."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
