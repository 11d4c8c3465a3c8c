"""The chunk sizes earlier runs chose, kept on disk so that the same call gives the same bits.

The chunk-size search times candidates on a shared machine, and timings drift: the same call
once chose K = 8 and then K = 16, and another K sums floats in another order (results agree
to about 1e-6, not bitwise). So a search's choice is stored under a key naming everything
that decides the program: the round program's own text at K = 1 (model, optimizers, batching,
shapes; the seed is an input, not part of it), the devices and the JAX version. The next run
with that key takes the stored K without searching.

The cache is `$FEDJAX_SIM_CACHE_DIR` (default `$XDG_CACHE_HOME/fedjax_sim`, else
`~/.cache/fedjax_sim`); set it to an empty string to turn it off.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import jax
import jaxlib


def cache_dir() -> Path | None:
    """Where chosen chunk sizes are kept, or None when the cache is off."""
    where = os.environ.get("FEDJAX_SIM_CACHE_DIR")
    if where is not None:
        return Path(where) if where else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedjax_sim"


def program_key(program_text: str, num_devices: int) -> str:
    """A key for one round program on this machine's devices and JAX."""
    device = jax.devices()[0]
    parts = [program_text, device.platform, device.device_kind, str(num_devices),
             str(jax.process_count()), jax.__version__, jaxlib.__version__]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _path(key: str) -> Path | None:
    root = cache_dir()
    return None if root is None else root / "chunk_size" / f"{key}.json"


def load(key: str) -> int | None:
    """The chunk size stored under `key`, or None (no entry, cache off, unreadable entry)."""
    path = _path(key)
    try:
        k = json.loads(path.read_text())["chunk_size"] if path else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return k if isinstance(k, int) and k >= 1 else None


def store(key: str, chunk_size: int, details: dict) -> None:
    """Keeps `chunk_size` under `key`, written atomically; a cache that cannot be written is
    warned about and skipped."""
    path = _path(key)
    if path is None:
        return
    entry = {"chunk_size": int(chunk_size), **details,
             "device": jax.devices()[0].device_kind,
             "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp",
                                         delete=False) as f:
            json.dump(entry, f, indent=1)
        os.replace(f.name, path)
    except OSError as e:
        warnings.warn(f"the chunk-size cache at {path.parent} cannot be written ({e}); the "
                      "next run of this program searches again (set FEDJAX_SIM_CACHE_DIR to a "
                      "writable directory, or to '' to turn the cache off)", stacklevel=3)
