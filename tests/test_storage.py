"""On-disk populations: memory-mapped .npy columns and SQLite read per cohort."""

import sqlite3

import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.data.storage import (
    SqliteColumn,
    is_in_memory,
    load_npy,
    load_sqlite,
    save_npy,
    save_sqlite,
)


@pytest.fixture(scope="module")
def population():
    train, _ = fs.data.synthetic(num_clients=25, max_examples_per_client=40, seed=3)
    return train


def _equal_data(a, b):
    np.testing.assert_array_equal(a.client_ids, b.client_ids)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert sorted(a.features) == sorted(b.features)
    for k in a.features:
        np.testing.assert_array_equal(np.asarray(a.features[k]), np.asarray(b.features[k]))


def _run(data, **kwargs):
    algo = fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.1),
                                batch_size=8)
    kwargs = {"rounds": 3, "cohort_size": 6, "chunk_size": 2, "seed": 1, **kwargs}
    return fs.simulate(algo, data, progress=False, **kwargs)


def test_npy_round_trip_is_memory_mapped(population, tmp_path):
    loaded = load_npy(save_npy(population, tmp_path / "pop"))
    _equal_data(population, loaded)
    assert all(isinstance(v, np.memmap) for v in loaded.features.values())
    assert not is_in_memory(loaded) and is_in_memory(population)
    assert is_in_memory(load_npy(tmp_path / "pop", mmap=False))


def test_sqlite_reads_any_rows(population, tmp_path):
    loaded = load_sqlite(save_sqlite(population, tmp_path / "pop.sqlite"), cache_clients=3)
    assert isinstance(loaded.features["x"], SqliteColumn)
    assert loaded.features["x"].shape == population.features["x"].shape
    rows = np.random.default_rng(0).integers(0, population.total_examples, 200)
    for k in population.features:
        np.testing.assert_array_equal(loaded.features[k][rows], population.features[k][rows])
    np.testing.assert_array_equal(loaded.client(7)["y"], population.client(7)["y"])
    _equal_data(population, loaded)


@pytest.mark.parametrize("backing", ["npy", "sqlite"])
def test_streamed_simulation_equals_in_memory(population, tmp_path, backing):
    path = (save_npy(population, tmp_path / "pop") if backing == "npy"
            else save_sqlite(population, tmp_path / "pop.sqlite"))
    disk = load_npy(path) if backing == "npy" else load_sqlite(path)
    streamed = _run(disk)  # not in memory: streamed by default, cohorts prefetched
    in_memory = _run(population, resident=False)
    resident = _run(population, resident=True)
    for k in in_memory.params:
        np.testing.assert_array_equal(streamed.params[k], in_memory.params[k])
        np.testing.assert_allclose(streamed.params[k], resident.params[k], rtol=1e-6, atol=1e-7)
    assert [h["train_loss"] for h in streamed.history] == \
        [h["train_loss"] for h in in_memory.history]


def test_streamed_bad_values_are_caught_when_read(population, tmp_path):
    bad = fs.data.FederatedData(population.client_ids,
                                {k: np.array(v) for k, v in population.features.items()},
                                population.offsets)
    lo = bad.offsets[4]
    bad.features["x"][lo + 1, 3] = np.nan
    disk = load_sqlite(save_sqlite(bad, tmp_path / "nan.sqlite"))
    with pytest.raises(ValueError, match=r"non-finite values .* client 'synthetic_0000004'"):
        _run(disk, cohort_size=25)
    bad.features["x"][lo + 1, 3] = 0.0
    bad.features["y"][lo] = 12
    disk = load_sqlite(save_sqlite(bad, tmp_path / "label.sqlite"))
    with pytest.raises(ValueError, match=r"labels out of range.*'synthetic_0000004'"):
        _run(disk, cohort_size=25)


def test_corrupt_files_name_the_file(population, tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 50)
    with pytest.raises(ValueError, match="garbage.sqlite"):
        load_sqlite(garbage)
    with pytest.raises(FileNotFoundError, match="missing.sqlite"):
        load_sqlite(tmp_path / "missing.sqlite")

    path = save_sqlite(population, tmp_path / "blob.sqlite")
    con = sqlite3.connect(path)
    con.execute("UPDATE clients SET data = ? WHERE idx = 2", (b"\x00\x01broken",))
    con.commit()
    con.close()
    with pytest.raises(ValueError, match=r"blob.sqlite: client #2 has a corrupt data blob"):
        load_sqlite(path).client(2)

    directory = save_npy(population, tmp_path / "npy")
    with pytest.raises(FileNotFoundError, match="save_npy"):
        load_npy(tmp_path)
    np.save(directory / "offsets.npy", population.offsets[:-1])
    with pytest.raises(ValueError, match="offsets do not match"):
        load_npy(directory)
    (directory / "x.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"x.npy: cannot read column 'x'"):
        load_npy(directory)
