"""The client store: gathered and scattered by client id inside the compiled round."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim import client_store
from fedjax_sim.engine import Engine, client_mesh


@pytest.mark.parametrize("mesh", [False, True])
def test_gather_gives_the_initial_state_until_written_and_padding_never_writes(mesh):
    engine = Engine(1, client_mesh() if mesh else None)
    template = {"c": jax.ShapeDtypeStruct((3,), jnp.float32), "n": jax.ShapeDtypeStruct((),
                                                                                      jnp.int32)}
    store = client_store.create(10, template, engine)
    assert store.num_rows % engine.num_devices == 0 and store.num_rows >= 10
    init = {"c": jnp.full(3, 7.0), "n": jnp.int32(-1)}
    ids = jnp.array([4, 1, 10, 11], jnp.int32)  # 10 and 11 are padding (>= num_clients)

    @jax.jit
    def round_trip(store, ids, rows):
        before = client_store.gather(store, ids, init)
        return before, client_store.scatter(store, ids, rows, 10)

    rows = {"c": jnp.arange(12.0).reshape(4, 3), "n": jnp.arange(4, dtype=jnp.int32)}
    before, store = round_trip(store, ids, rows)
    np.testing.assert_array_equal(before["c"], np.full((4, 3), 7.0))  # never written: init
    after = client_store.gather(store, jnp.array([1, 4, 5, 10]), init)
    np.testing.assert_array_equal(after["c"][:2], [[3, 4, 5], [0, 1, 2]])
    np.testing.assert_array_equal(after["n"], [1, 0, -1, -1])  # 5 untouched, 10 padding
    written = np.asarray(store.written)
    assert written[[1, 4]].all() and not written[[0, 2, 3, 5, 6, 7, 8, 9]].any()
    if store.num_rows > 10:
        assert not written[10:].any()  # padding ids never write, even into spare rows
    if mesh:
        assert store.table["c"].sharding.spec[0] == "clients"


def test_the_chunk_gather_and_scatter_equal_the_cohort_ones():
    """`gather_few` / `scatter_few` (a chunk's rows one by one) against `gather` / `scatter`,
    with padding ids, a client excluded from writing, and a padding id whose clamped index
    is the last row, which a real client of the same chunk writes first."""
    engine = Engine(1, None)
    template = {"c": jax.ShapeDtypeStruct((3,), jnp.float32)}
    n = 6
    store = client_store.create(n, template, engine)
    last = store.num_rows - 1
    init = {"c": jnp.full(3, -1.0)}
    first = {"c": jnp.arange(18.0).reshape(6, 3)}
    store = client_store.scatter(store, jnp.array([0, 2, 5], jnp.int32),
                                 {"c": first["c"][:3]}, n)
    ids = jnp.array([last, 2, n + 3, 4, 1, n], jnp.int32)
    writes = jnp.array([True, False, True, True, True, True])
    rows = {"c": 100.0 + jnp.arange(18.0).reshape(6, 3)}
    np.testing.assert_array_equal(client_store.gather_few(store, ids, init)["c"],
                                  client_store.gather(store, ids, init)["c"])
    few = client_store.scatter_few(store, ids, rows, n, writes)
    whole = client_store.scatter(store, ids, rows, n, writes)
    np.testing.assert_array_equal(few.table["c"], whole.table["c"])
    np.testing.assert_array_equal(few.written, whole.written)
    np.testing.assert_array_equal(few.table["c"][last], rows["c"][0])  # not undone by padding
    np.testing.assert_array_equal(few.table["c"][2], first["c"][1])  # excluded: kept


def test_a_client_state_of_another_structure_is_named():
    with pytest.raises(ValueError, match="client state structure differs from the store's"):
        client_store.check_template({"c": jnp.zeros(3)}, ({"c": jnp.zeros(3)},))
    with pytest.raises(ValueError, match=r"leaf of shape \(4,\).*does not fit the store's "
                       r"\(3,\)"):
        client_store.check_template({"c": jnp.zeros(3)}, {"c": jnp.zeros(4)})
    with pytest.raises(TypeError, match="client_state must return a pytree of arrays"):
        client_store.create(3, {"c": "zeros"}, Engine())


@pytest.mark.parametrize("mapped", [False, True])
def test_a_host_store_reads_initial_rows_until_written_and_padding_never_writes(mapped,
                                                                              tmp_path):
    template = {"c": jax.ShapeDtypeStruct((3,), jnp.float32)}
    store = client_store.HostStore.create(10, template, tmp_path if mapped else None)
    ids = np.array([4, 1, 10, 11])  # 10 and 11 are padding
    before = store.rows(ids)
    assert not before.known.any() and (before.rows["c"] == 0).all()
    store.write(ids, {"c": np.arange(12.0).reshape(4, 3)})
    after = store.rows(np.array([1, 4, 5, 10]))
    np.testing.assert_array_equal(after.known, [True, True, False, False])
    np.testing.assert_array_equal(after.rows["c"][:2], [[3, 4, 5], [0, 1, 2]])
    np.testing.assert_array_equal(after.rows["c"][2:], 0)  # 5 untouched, 10 padding
    assert store.written.sum() == 2
    filled = client_store.fill(after, {"c": jnp.full(3, 7.0)})
    np.testing.assert_array_equal(filled["c"][2:], 7.0)
    if mapped:  # the table is the files: another mapping of them sees the rows
        np.testing.assert_array_equal(np.load(tmp_path / "leaf_0.npy", mmap_mode="r")[4],
                                      [0, 1, 2])
