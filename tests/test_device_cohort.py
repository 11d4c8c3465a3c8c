"""Cohorts packed on the device against the numpy packer, and the on-device sampler."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim.data import device_cohort
from fedjax_sim.data.cohort import Batching, CohortShape, _mix, pack_cohort, resident_order
from fedjax_sim.data.device_cohort import DevicePacking, mix


@pytest.fixture(scope="module")
def population():
    """40 clients of 1 to 49 examples."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 50, 40)
    ids = np.repeat(np.arange(40), sizes)
    return fs.data.from_arrays(ids, {"x": rng.normal(size=(len(ids), 3)).astype(np.float32),
                                     "y": np.zeros(len(ids), np.int32)})


def _assert_same_cohort(want, got):
    for field in dataclasses.fields(want):
        a, b = getattr(want, field.name), getattr(got, field.name)
        if field.name == "batch_size":
            assert a == b
        else:
            assert np.asarray(a).dtype == np.asarray(b).dtype, field.name
            np.testing.assert_array_equal(np.asarray(b), a, err_msg=field.name)


def test_mix_is_splitmix64_on_word_pairs():
    x = np.random.default_rng(1).integers(0, 2**63, 1000, dtype=np.uint64) * np.uint64(2) + \
        np.uint64(1)
    x = np.concatenate([x, np.array([0, 2**64 - 1], np.uint64)])
    hi, lo = jax.jit(mix)((jnp.asarray(x >> np.uint64(32), jnp.uint32),
                           jnp.asarray(x & np.uint64(0xFFFFFFFF), jnp.uint32)))
    got = (np.asarray(hi).astype(np.uint64) << np.uint64(32)) | np.asarray(lo).astype(np.uint64)
    np.testing.assert_array_equal(got, _mix(x))


@pytest.mark.parametrize("batching, cohort, multiple", [
    (Batching(5, num_epochs=3), 7, 4),               # epochs back to back, padding clients
    (Batching(4, max_steps=3, num_epochs=2), 12, 1),  # each client cut at its step cap
    (Batching(None, max_examples_per_client=9), 40, 1),  # full batches, the whole population
    pytest.param(Batching(7), 10, 1, marks=pytest.mark.slow),
    pytest.param(Batching(6, drop_remainder=True, num_epochs=2), 9, 2,  # some take no step
                 marks=pytest.mark.slow),
    pytest.param(Batching(3, shuffle=False, num_epochs=2), 8, 1, marks=pytest.mark.slow),
])
@pytest.mark.parametrize("shuffle_by", ["rank", "sort"])
def test_device_packing_equals_the_numpy_packer(population, batching, cohort, multiple,
                                                shuffle_by, monkeypatch):
    if shuffle_by == "sort":  # the shuffle of large clients
        monkeypatch.setattr(device_cohort, "RANK_LIMIT", 0)
    shape = CohortShape.for_population(population, batching, cohort, multiple)
    packing = DevicePacking.for_population(population, batching, shape, cohort)
    tables = jax.tree.map(jnp.asarray, packing.tables(population))
    pack = jax.jit(lambda t, i, r: packing.pack(t, i, seed=jnp.uint32(11), round_num=r))
    rng = np.random.default_rng(2)
    for round_num in (0, 5, 2**31 - 1):
        ids = rng.choice(population.num_clients, cohort, replace=False)
        want = resident_order(*pack_cohort(population, ids, batching, shape, seed=11,
                                           round_num=round_num))
        _assert_same_cohort(want, pack(tables, jnp.asarray(ids, jnp.int32),
                                       jnp.int32(round_num)))


def test_a_second_pass_keeps_the_first_pass_order(population):
    """Mime's full-batch pass lines up with the training pass's sorted clients, as the
    host `Packer` lines them up."""
    train, full = Batching(5, num_epochs=2), Batching(None)
    shapes = [CohortShape.for_population(population, b, 10) for b in (full, train)]
    packings = [DevicePacking.for_population(population, b, s, 10)
                for b, s in zip((full, train), shapes, strict=True)]

    @jax.jit
    def pack(ids, r):
        seed = jnp.uint32(3)
        main = packings[1].pack(packings[1].tables(population), ids, seed=seed, round_num=r)
        first = packings[0].pack(packings[0].tables(population), main.client_ids[:10],
                                 seed=seed, round_num=r, sort=False)
        return first, main

    ids = np.random.default_rng(4).choice(40, 10, replace=False)
    host = fs.rounds.Packer(population, (full, train), 10, fs.Engine())
    cohorts, rows = host.pack(ids, seed=3, round_num=1)
    got = pack(jnp.asarray(ids, jnp.int32), jnp.int32(1))
    for want, r, g in zip(cohorts, rows, got, strict=True):
        _assert_same_cohort(resident_order(want, r), g)


def test_stragglers_are_refused_on_the_device(population):
    batching = Batching(5, straggler_fraction=0.5)
    shape = CohortShape.for_population(population, batching, 4)
    with pytest.raises(ValueError, match="straggler_fraction draws stragglers on the host"):
        DevicePacking.for_population(population, batching, shape, 4)


def test_on_device_sampler_draws_alike_on_host_and_device():
    sampler = fs.sampling.on_device(50, 7)
    drawn = jax.jit(jax.vmap(lambda r: sampler.device(jnp.uint32(9), r)))(
        jnp.arange(300, dtype=jnp.int32))
    for r in (0, 1, 299):
        np.testing.assert_array_equal(sampler.sample(9, r), np.asarray(drawn[r]))
    drawn = np.asarray(drawn)
    assert all(len(set(row)) == 7 for row in drawn) and drawn.min() >= 0 and drawn.max() < 50
    assert not np.array_equal(sampler.sample(9, 0), sampler.sample(10, 0))
    # Uniform: each client in a cohort with probability 7/50 (300 rounds: mean 42, sd 6).
    counts = np.bincount(drawn.ravel(), minlength=50)
    assert counts.min() > 42 - 5 * 6 and counts.max() < 42 + 5 * 6
    assert sampler.participation == fs.sampling.Participation("fixed", 50, 7)
    with pytest.raises(ValueError, match="cohort_size 60 is larger than the population of 50"):
        fs.sampling.on_device(50, 60)
