"""The vectorization width K: the candidates, the timed search on the first cohort, and the
cache of earlier runs' choices that makes the same call give the same bits.

The search times candidates on a shared machine, and timings drift: the same call once chose
K = 8 and then K = 16, and another K sums floats in another order (results agree to about
1e-6, not bitwise). So a search's choice is stored under a key naming everything that decides
the program: the round program's own text at K = 1 (model, optimizers, batching, shapes; the
seed is an input, not part of it), the devices and the JAX version. The next run with that key
takes the stored K without searching. The cache is `$FEDJAX_SIM_CACHE_DIR` (default
`$XDG_CACHE_HOME/fedjax_sim`, else `~/.cache/fedjax_sim`); an empty value turns it off.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import jax
import jaxlib
import numpy as np
from jax.experimental import multihost_utils

from fedjax_sim.engine import Engine
from fedjax_sim.rounds import RoundRunner, device_memory


def chunk_candidates(per_device: int) -> list[int]:
    """Powers of two up to the per-device cohort, and the per-device cohort itself."""
    out, k = [], 1
    while k < per_device:
        out.append(k)
        k *= 2
    return out + [per_device]


def choose_chunk_size(algorithm, data, cohort_size, state, indices, *, seed, mesh, pool,
                      store=None, candidates=None, memory_budget=None, repeats=1) -> int:
    """Times vectorization widths K on the first cohort and returns the fastest (see
    `search_chunk_size`)."""
    return search_chunk_size(algorithm, data, cohort_size, state, indices, seed=seed,
                             mesh=mesh, pool=pool, store=store, candidates=candidates,
                             memory_budget=memory_budget, repeats=repeats)[0]


# A candidate of a search is timed on 1 / PARTIAL_ROUND of the cohort when a round is longer
# than LONG_ROUND_S: W3's 100-client round takes 20 s on a 2-core CPU.
PARTIAL_ROUND = 4
LONG_ROUND_S = 2.0


def search_chunk_size(algorithm, data, cohort_size, state, indices, *, seed, mesh, pool,
                      store=None, candidates=None, memory_budget=None,
                      repeats=1) -> tuple[int, RoundRunner]:
    """Times vectorization widths K on the first cohort; returns the fastest and its runner,
    compiled (the run reuses it rather than compile it again).

    Time per round falls with K while vmapping amortizes per-step overhead, then rises once
    per-client batched matmuls or memory traffic dominate (measured on a 2-core CPU with a
    784-200-10 MLP: K = 1 to 8 best, K = C 2x slower; accelerators favour far wider K).
    Candidates (`chunk_candidates`) are compiled and timed by `autotune`; one whose compiled
    program needs more than `memory_budget` bytes of temporaries (XLA's own memory analysis)
    ends the search. Every candidate shares `pool` (`RoundRunner`), and a cohort is packed
    for each timed run rather than kept per candidate: a host-packed cohort can be large. A
    long round is timed on part of the cohort (`PARTIAL_ROUND`).
    """
    devices = 1 if mesh is None else mesh.shape["clients"]
    if candidates is None:
        candidates = chunk_candidates(-(-cohort_size // devices))
    if memory_budget is None:
        memory_budget = _memory_budget()
    runners = {}

    def build(k):
        runner = runners[k] = RoundRunner(algorithm, data, cohort_size, Engine(k, mesh), seed,
                                          pool)
        runner.compile(state, store, runner.pack(indices, 0))
        mem = runner.compiled.memory_analysis()
        return mem is None or mem.temp_size_in_bytes <= memory_budget

    # Long rounds are timed on part of the cohort (the rest padding, which takes no step)
    # and scaled up; a round the first candidate's part puts under LONG_ROUND_S is timed whole
    # from then on (there a padding client's epilogue is no longer small beside a step).
    whole = [False]

    def seconds(k):
        real = len(indices) if whole[0] else min(len(indices), max(
            -(-len(indices) // PARTIAL_ROUND), k * devices))
        runner = runners[k]
        packed = jax.block_until_ready(runner.pack(indices[:real], 0))
        t = time.perf_counter()
        jax.block_until_ready(runner(state, store, packed, commit=False))
        estimate = (time.perf_counter() - t) * len(indices) / real
        if not whole[0] and process0_decides(estimate < LONG_ROUND_S):
            whole[0] = True
            return seconds(k)
        return estimate

    k = autotune(sorted(candidates), build, seconds, repeats=repeats)
    return k, runners.get(k) or RoundRunner(algorithm, data, cohort_size, Engine(k, mesh),
                                            seed, pool)


def round_program_key(algorithm, data, cohort_size, state, indices, *, seed, mesh, pool,
                      store=None) -> str:
    """A key for the round program (its text at K = 1) on these devices: what a cached chunk
    size, or a checkpoint's configuration, must match."""
    devices = 1 if mesh is None else mesh.shape["clients"]
    runner = RoundRunner(algorithm, data, cohort_size, Engine(1, mesh), seed, pool)
    return program_key(runner.lower(state, store, runner.pack(indices, 0)).as_text(), devices)


def cached_chunk_size(algorithm, data, cohort_size, state, indices, *, seed, mesh,
                      pool, store=None) -> tuple[int, str, RoundRunner | None]:
    """(K, "cache" or "search", the search's compiled runner or None): the K an earlier run
    chose for this very program on these devices (the cache), else the search's choice,
    which is then stored. So the same call gives the same K, and the same bits, run after
    run."""
    devices = 1 if mesh is None else mesh.shape["clients"]
    key = round_program_key(algorithm, data, cohort_size, state, indices, seed=seed, mesh=mesh,
                            pool=pool, store=store)
    k = process0_decides((load_choice(key) if jax.process_index() == 0 else None) or 0)
    if k:
        return k, "cache", None
    k, searched = search_chunk_size(algorithm, data, cohort_size, state, indices, seed=seed,
                                    mesh=mesh, pool=pool, store=store)
    if jax.process_index() == 0:
        save_choice(key, k, {"cohort_size": cohort_size, "devices": devices})
    return k, "search", searched


def autotune(candidates, build, seconds, *, repeats=1, give_up=2.0, stop=1.5) -> int:
    """The candidate with the fastest timed run: `build(k)` prepares candidate k and says
    whether it fits; `seconds(k)` times one run of it.

    A sweep times each candidate once in order, stopping before the first that does not fit
    and after the first over `stop` x the best so far (past the best K times rise, and each
    further candidate costs a compile: W1's 100-client search on a 2-core CPU spent 1.5-2 s
    compiling each of K = 32, 64 and 100 after K = 16 was 1.8x slower than K = 1). Then the
    candidates within `give_up` x the sweep's best are timed `repeats` more times, round
    robin, and each is scored by its fastest run (one more run each by default: with two,
    W3's 100-client search took 785 s on a 2-core CPU, against 498 s for two back-to-back
    runs each). Timing round robin rather than one candidate after another matters on a
    shared machine, where a slow spell lasting seconds would otherwise land on one candidate
    only (on a 2-core CPU, back-to-back timing once picked K = 1 for a 1,000-client logistic
    regression round, which runs 1.2-1.6x as long as K = 8).
    Every decision is process 0's, so all processes run the same programs.
    """
    times: dict[int, list[float]] = {}
    for k in candidates:
        if not process0_decides(build(k)):
            break
        times[k] = [seconds(k)]
        best = min(t[0] for t in times.values())
        if process0_decides(times[k][0] > stop * best):
            break
    if not times:
        return candidates[0]
    best = min(t[0] for t in times.values())
    contenders = [k for k in times if process0_decides(times[k][0] <= give_up * best)]
    for _ in range(repeats):
        for k in contenders:
            times[k].append(seconds(k))
    return process0_decides(min(contenders, key=lambda k: min(times[k])))


def process0_decides(value: int) -> int:
    """Process 0's value on every process. Every choice of which programs run (and so which
    collectives) must agree across processes, or their collectives mismatch and hang; local
    timings and memory budgets differ between processes."""
    if jax.process_count() == 1:
        return int(value)
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _memory_budget() -> int:
    memory = device_memory()
    if memory:
        return int(memory * 0.6)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.25)


def cache_dir() -> Path | None:
    """Where chosen chunk sizes are kept, or None when the cache is off."""
    where = os.environ.get("FEDJAX_SIM_CACHE_DIR")
    if where is not None:
        return Path(where) if where else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedjax_sim"


def use_compilation_cache() -> Path | None:
    """Turns on JAX's persistent compilation cache in `cache_dir()/xla`, unless the user set
    `jax_compilation_cache_dir` (theirs wins) or the cache is off; returns the directory used.

    A later run of the same program then loads its executable instead of compiling it:
    1.48 s against 0.05 s for W1's 100-client round on a 2-core CPU. One process only: the
    processes of a multi-process run would write the same entries at once.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    root = cache_dir()
    if root is None or jax.process_count() > 1:
        return None
    jax.config.update("jax_compilation_cache_dir", str(root / "xla"))
    # JAX keeps only compiles over 1 s by default; a search candidate just under it would
    # then compile again on the rerun (the default job's K = 16: 1.2 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return root / "xla"


def program_key(program_text: str, num_devices: int) -> str:
    """A key for one round program on this machine's devices and JAX."""
    device = jax.devices()[0]
    parts = [program_text, device.platform, device.device_kind, str(num_devices),
             str(jax.process_count()), jax.__version__, jaxlib.__version__]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _choice_path(key: str) -> Path | None:
    root = cache_dir()
    return None if root is None else root / "chunk_size" / f"{key}.json"


def load_choice(key: str) -> int | None:
    """The chunk size stored under `key`, or None (no entry, cache off, unreadable entry)."""
    path = _choice_path(key)
    try:
        k = json.loads(path.read_text())["chunk_size"] if path else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return k if isinstance(k, int) and k >= 1 else None


def save_choice(key: str, chunk_size: int, details: dict) -> None:
    """Keeps `chunk_size` under `key`, written atomically; a cache that cannot be written is
    warned about and skipped."""
    path = _choice_path(key)
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
