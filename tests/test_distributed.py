"""Sharded and multi-process simulation give the model that one device gives.

conftest.py provides 8 CPU devices. The multi-process test starts two fresh Python processes
(tests/multihost_worker.py) that form a `jax.distributed` job on 127.0.0.1 with one CPU device
each, and compares them with the same run in this process.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import multihost_worker as worker
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from fedjax_sim import aggregators
from fedjax_sim.chunk_size import chunk_candidates
from fedjax_sim.data import Batching, CohortShape, pack_cohort, synthetic
from fedjax_sim.data.cohort import resident_order
from fedjax_sim.engine import (
    CLIENTS,
    ClientResult,
    ClientUpdate,
    Engine,
    client_mesh,
    place_cohort,
    replicate,
    run_clients,
)

RTOL, ATOL = 1e-5, 1e-6
WORKER_TIMEOUT_S = 120


def assert_summaries(actual: dict, expected: dict, *, exact: bool, what: str) -> None:
    """Compares two `worker.summarize` dicts: ids and strings exactly, floats to tolerance (or
    bitwise when `exact`)."""
    assert sorted(actual) == sorted(expected), f"{what}: different entries"
    for k in sorted(expected):
        a, e = np.asarray(actual[k]), np.asarray(expected[k])
        assert a.shape == e.shape, f"{what}: {k}: shape {a.shape} != {e.shape}"
        if exact or not np.issubdtype(e.dtype, np.floating):
            np.testing.assert_array_equal(a, e, err_msg=f"{what}: {k}")
        else:
            np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL, err_msg=f"{what}: {k}")


@pytest.fixture(scope="module")
def one_device():
    """The reference: cohorts of 16 clients on one device (K=1)."""
    return worker.summarize(worker.run(None, cohort_size=16))


# -- one process, 8 devices ------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 2])
def test_eight_devices_match_one_device(one_device, chunk):
    """Several rounds (params, train losses, per-client train and eval metrics) on 8 devices
    equal one device. With cohort 16 and K=1 each device runs two clients; with K=2, one chunk.
    """
    assert len(jax.devices()) == 8
    result = worker.run(client_mesh(), cohort_size=16, chunk_size=chunk)
    assert result.chunk_size == chunk
    assert_summaries(worker.summarize(result), one_device, exact=False,
                     what=f"8 devices, K={chunk}")


def test_host_packed_pool_matches_resident():
    """The round's clients gathered on the host (`resident=False`) train the same model as the
    population resident on the devices."""
    mesh = client_mesh()
    host = worker.run(mesh, cohort_size=16, chunk_size=2, resident=False, evaluate=False)
    resident = worker.run(mesh, cohort_size=16, chunk_size=2, resident=True, evaluate=False)
    assert_summaries(worker.summarize(host), worker.summarize(resident), exact=False,
                     what="host pool vs resident")


def test_cohort_spans_all_devices():
    """The equality tests above only exercise the cross-device reduction if every device has
    real clients: a cohort of 16 at K=1 puts two real clients on each of the 8 devices."""
    train, _ = synthetic(num_clients=worker.NUM_CLIENTS,
                         max_examples_per_client=worker.MAX_EXAMPLES, seed=0)
    engine = Engine(chunk_size=1, mesh=client_mesh())
    batching = Batching(batch_size=10)
    shape = CohortShape.for_population(train, batching, 16, engine.cohort_multiple)
    assert shape.size == 16
    cohort, rows = pack_cohort(train, np.arange(16), batching, shape, seed=0, round_num=0)
    placed = place_cohort(resident_order(cohort, rows), engine)
    shards = placed.weights.addressable_shards
    assert {s.device for s in shards} == set(jax.devices())
    for s in shards:
        assert s.data.shape == (2,) and np.all(np.asarray(s.data) > 0), s


# -- the shard_map gradient trap -------------------------------------------------------------
def _grad_at_broadcast_update() -> ClientUpdate:
    """A client whose output is a gradient taken at the broadcast (replicated) value w:
    d/dw [0.5 * w^2 * s] = w * s, with s the sum of the client's first feature."""

    def init(w, ctx):
        del w, ctx
        return jnp.zeros((), jnp.float32)

    def step(s, batch, mask):
        return s + jnp.sum(jnp.where(mask, batch["x"][:, 0], 0.0))

    def finalize(w, s, ctx):
        g = jax.grad(lambda w: 0.5 * w * w * s)(w)
        return ClientResult(g, metrics={"g": g})

    return ClientUpdate(init, step, finalize)


@functools.partial(jax.jit, static_argnames=("update", "engine"))
def _run_clients(update, w, cohort, pool, *, engine):
    agg = aggregators.default()
    return run_clients(update, cohort, pool, w, jax.random.key(0), engine=engine,
                       aggregator=agg, agg_state=agg.init(w))


def test_gradient_at_the_broadcast_is_not_summed_over_devices():
    """Inside shard_map, the gradient with respect to a replicated (device-invariant) input is
    summed over devices. The engine marks the broadcast as varying, so each client's gradient
    is its own: on 8 devices the per-client outputs equal those on one device.
    """
    train, _ = synthetic(num_clients=worker.NUM_CLIENTS,
                         max_examples_per_client=worker.MAX_EXAMPLES, seed=0)
    update = _grad_at_broadcast_update()
    batching = Batching(batch_size=10, shuffle=False)
    w = jnp.float32(0.5)
    per_client = []
    for mesh in (None, client_mesh()):
        engine = Engine(chunk_size=1, mesh=mesh)
        shape = CohortShape.for_population(train, batching, 16, engine.cohort_multiple)
        cohort, rows = pack_cohort(train, np.arange(16), batching, shape, seed=0, round_num=0)
        out = _run_clients(update, replicate(w, engine),
                           place_cohort(resident_order(cohort, rows), engine),
                           replicate({"x": train.features["x"]}, engine), engine=engine)
        ids = np.asarray(cohort.client_ids)
        per_client.append(np.asarray(out.metrics["g"])[np.argsort(ids)])
    # The expected value, computed on the host.
    expected = np.array([0.5 * train.features["x"][train.offsets[c]:train.offsets[c + 1], 0].sum()
                         for c in range(16)], np.float32)
    np.testing.assert_allclose(per_client[0], expected, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(per_client[1], expected, rtol=RTOL, atol=1e-5)


def test_the_trap_is_real():
    """The control for the test above: without marking w varying, shard_map sums the gradient
    over the 8 devices (so a test that compares 8 devices with 1 would catch the omission)."""
    mesh = client_mesh()
    s = jnp.arange(8, dtype=jnp.float32)

    def grads(mark_varying):
        def local(w, s):
            if mark_varying:
                w = lax.pcast(w, CLIENTS, to="varying")
            return jax.grad(lambda w: 0.5 * w * w * s[0])(w)[None]

        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(CLIENTS)),
                                     out_specs=P(CLIENTS)))(jnp.float32(1.0), s)

    np.testing.assert_allclose(grads(True), np.arange(8))
    np.testing.assert_allclose(grads(False), np.full(8, np.arange(8).sum()))


# -- two processes ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(num_processes: int, out_dir: Path) -> list[dict]:
    """Runs the worker processes; on a hang (a stuck collective ignores SIGTERM) kills them."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    script = Path(__file__).with_name("multihost_worker.py")
    port = _free_port()
    procs, logs = [], []
    try:
        for i in range(num_processes):
            log = open(out_dir / f"process_{i}.log", "w+b")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(script), str(i), str(num_processes), str(port), str(out_dir)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        # Poll, so that one failed process (whose peer then waits forever) fails at once.
        failed, deadline = None, time.monotonic() + WORKER_TIMEOUT_S
        while failed is None and any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                failed = f"the processes did not finish in {WORKER_TIMEOUT_S} s"
            failed = failed or next((f"process {i} exited with {p.returncode}"
                                     for i, p in enumerate(procs) if p.poll()), None)
            time.sleep(0.2)
        failed = failed or next((f"process {i} exited with {p.returncode}"
                                 for i, p in enumerate(procs) if p.returncode), None)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    if failed:
        output = []
        for i, log in enumerate(logs):
            log.seek(0)
            output.append(f"--- process {i} ---\n" + log.read().decode(errors="replace")[-4000:])
        for log in logs:
            log.close()
        pytest.fail(f"{failed}\n" + "\n".join(output))
    for log in logs:
        log.close()
    return [dict(np.load(out_dir / f"process_{i}.npz")) for i in range(num_processes)]


@pytest.mark.slow  # two real processes under jax.distributed: 29 s
def test_two_processes_match_one_process(tmp_path):
    """Two processes with one CPU device each (a 2-device global mesh) train, evaluate and
    record exactly the same thing in both processes, and the same as one process with a
    2-device mesh and as one device; SCAFFOLD (its client store split over the processes)
    too."""
    procs = _run_workers(2, tmp_path)
    assert_summaries(procs[1], procs[0], exact=True, what="process 1 vs process 0")
    assert any(k.endswith("/eval/accuracy") for k in procs[0])
    # The timed choice of K, made by process 0 for all: cohort 8 on 2 devices, 4 per device.
    assert [int(p.pop("auto_chunk_size")) in chunk_candidates(4) for p in procs] == [True] * 2

    scaffold = {k.split("/", 1)[1]: procs[0].pop(k) for k in list(procs[0])
                if k.startswith("scaffold/")}
    for k in [k for k in procs[1] if k.startswith("scaffold/")]:
        procs[1].pop(k)
    two_devices = worker.summarize(worker.run(client_mesh(jax.devices()[:2])))
    assert_summaries(procs[0], two_devices, exact=False, what="2 processes vs 1 process")
    one = worker.summarize(worker.run(None))
    assert_summaries(procs[0], one, exact=False, what="2 processes vs 1 device")
    # SCAFFOLD: its client store split over the two processes' devices.
    alone = worker.summarize(worker.run(None, algorithm="scaffold", evaluate=False))
    assert_summaries(scaffold, alone, exact=False, what="SCAFFOLD, 2 processes vs 1 device")
