"""`FederatedData`, the Synthetic generator and cohort packing (host-side numpy, no compiling)."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_sim.data import (
    Batching,
    CohortShape,
    FederatedData,
    from_arrays,
    from_client_dict,
    pack_cohort,
    synthetic,
)
from fedjax_sim.data.cohort import _argsort_within, host_pool, resident_order
from fedjax_sim.data.federated import rows_of


# -- FederatedData ---------------------------------------------------------------------------
def test_from_arrays_groups_by_first_appearance_and_keeps_order():
    ids = ["b", "a", "b", "c", "a", "b"]
    x = np.arange(6, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    y = np.array([10, 11, 12, 13, 14, 15], dtype=np.int32)
    data = from_arrays(ids, {"x": x, "y": y})
    assert data.client_ids.tolist() == ["b", "a", "c"]
    assert data.num_examples.tolist() == [3, 2, 1]
    assert data.offsets.tolist() == [0, 3, 5, 6]
    assert data.total_examples == 6 and len(data) == 3 and data.num_clients == 3
    # Rows of each client keep their input order.
    assert data.client(0)["y"].tolist() == [10, 12, 15]
    assert data.client(1)["y"].tolist() == [11, 14]
    assert data.client(2)["y"].tolist() == [13]
    np.testing.assert_array_equal(data.client(0)["x"][:, 0], [0, 2, 5])
    assert data.nbytes == x.nbytes + y.nbytes


def test_from_arrays_integer_ids_become_strings():
    data = from_arrays(np.array([7, 3, 7]), {"y": np.array([0, 1, 2])})
    assert data.client_ids.tolist() == ["7", "3"]
    assert data.client(0)["y"].tolist() == [0, 2]


def test_from_client_dict_keeps_client_order():
    rng = np.random.default_rng(0)
    clients = {
        "z": {"x": rng.normal(size=(4, 3)).astype(np.float32), "y": np.arange(4)},
        "a": {"x": rng.normal(size=(2, 3)).astype(np.float32), "y": np.arange(2)},
    }
    data = from_client_dict(clients)
    assert data.client_ids.tolist() == ["z", "a"]
    assert data.num_examples.tolist() == [4, 2]
    for i, cid in enumerate(["z", "a"]):
        for k in ("x", "y"):
            np.testing.assert_array_equal(data.client(i)[k], clients[cid][k])


@pytest.fixture
def small():
    sizes = [3, 1, 4, 2]
    clients = {f"c{i}": {"x": np.full((n, 2), i, np.float32),
                         "y": np.arange(n, dtype=np.int32) + 10 * i}
               for i, n in enumerate(sizes)}
    return from_client_dict(clients), clients


def test_subset(small):
    data, clients = small
    sub = data.subset([2, 0])
    assert isinstance(sub, FederatedData)
    assert sub.client_ids.tolist() == ["c2", "c0"]
    assert sub.num_examples.tolist() == [4, 3]
    assert sub.offsets.tolist() == [0, 4, 7]
    np.testing.assert_array_equal(sub.features["y"],
                                  np.concatenate([clients["c2"]["y"], clients["c0"]["y"]]))
    np.testing.assert_array_equal(sub.client(1)["x"], clients["c0"]["x"])


def test_get_clients_and_index_of(small):
    data, clients = small
    got = data.get_clients(["c3", "c1"])
    assert list(got) == ["c3", "c1"]
    for cid in got:
        np.testing.assert_array_equal(got[cid]["y"], clients[cid]["y"])
        np.testing.assert_array_equal(got[cid]["x"], clients[cid]["x"])
    assert data.index_of(["c3", "c0", "c2"]).tolist() == [3, 0, 2]
    assert data.index_of(np.array(["c1"])).tolist() == [1]
    with pytest.raises(KeyError, match="nope"):
        data.index_of(["c0", "nope"])
    with pytest.raises(KeyError, match="ghost"):
        data.get_clients(["ghost"])


def test_rows_of(small):
    data, _ = small  # offsets [0, 3, 4, 8, 10]
    assert data.offsets.tolist() == [0, 3, 4, 8, 10]
    assert rows_of(data.offsets, np.array([2, 0])).tolist() == [4, 5, 6, 7, 0, 1, 2]
    assert rows_of(data.offsets, np.array([1, 3, 1])).tolist() == [3, 8, 9, 3]
    assert rows_of(data.offsets, np.array([], dtype=np.int64)).tolist() == []


# -- Synthetic -------------------------------------------------------------------------------
def test_synthetic_shapes_and_labels():
    train, test = synthetic(1.0, 1.0, num_clients=20, seed=0)
    for d in (train, test):
        assert d.num_clients == 20
        assert d.features["x"].shape == (d.total_examples, 60)
        assert d.features["x"].dtype == np.float32
        assert d.features["y"].shape == (d.total_examples,)
        y = d.features["y"]
        assert y.min() >= 0 and y.max() < 10
        assert np.all(np.isfinite(d.features["x"]))
    assert train.client_ids.tolist() == test.client_ids.tolist()
    # Non-empty train and test per client.
    assert np.all(train.num_examples >= 1) and np.all(test.num_examples >= 1)
    # Several classes appear overall.
    assert len(np.unique(train.features["y"])) > 3


def test_synthetic_example_counts_follow_lognormal_plus_50():
    num_clients, seed = 40, 3
    train, test = synthetic(0.5, 0.5, num_clients=num_clients, seed=seed)
    total = train.num_examples + test.num_examples
    assert np.all(total >= 50)
    expected = np.random.default_rng(seed).lognormal(4, 2, num_clients).astype(np.int64) + 50
    np.testing.assert_array_equal(total, expected)
    # The test split is about 10% of each client.
    frac = test.num_examples / total
    assert np.all(frac > 0.05) and np.all(frac < 0.15)


def test_synthetic_deterministic_per_seed():
    a_tr, a_te = synthetic(1.0, 1.0, num_clients=10, seed=5)
    b_tr, b_te = synthetic(1.0, 1.0, num_clients=10, seed=5)
    c_tr, _ = synthetic(1.0, 1.0, num_clients=10, seed=6)
    for a, b in ((a_tr, b_tr), (a_te, b_te)):
        np.testing.assert_array_equal(a.offsets, b.offsets)
        for k in ("x", "y"):
            np.testing.assert_array_equal(a.features[k], b.features[k])
    differs = (c_tr.offsets.shape != a_tr.offsets.shape
               or not np.array_equal(c_tr.offsets, a_tr.offsets)
               or c_tr.features["x"].shape != a_tr.features["x"].shape
               or not np.array_equal(c_tr.features["x"], a_tr.features["x"]))
    assert differs


def test_synthetic_max_examples_per_client_caps():
    cap = 60
    train, test = synthetic(num_clients=30, max_examples_per_client=cap, seed=0)
    uncapped_tr, uncapped_te = synthetic(num_clients=30, seed=0)
    total = train.num_examples + test.num_examples
    uncapped = uncapped_tr.num_examples + uncapped_te.num_examples
    assert np.all(total <= cap)
    np.testing.assert_array_equal(total, np.minimum(uncapped, cap))
    assert np.any(uncapped > cap)  # the cap actually bit
    assert np.all(train.num_examples >= 1) and np.all(test.num_examples >= 1)


def test_synthetic_max_examples_too_small_for_split():
    with pytest.raises(ValueError, match="max_examples_per_client"):
        synthetic(num_clients=3, max_examples_per_client=1)


def test_synthetic_iid_vs_non_iid():
    iid_tr, _ = synthetic(1.0, 1.0, num_clients=20, iid=True, seed=0)
    non_tr, _ = synthetic(1.0, 1.0, num_clients=20, iid=False, seed=0)

    def client_means(d):
        return np.stack([d.client(i)["x"].mean(0) for i in range(d.num_clients)])

    # IID: v_k = 0, so every client's first feature (variance 1) averages near 0; non-IID:
    # v_k ~ N(B_k, 1), B_k ~ N(0, 1), so client means spread out.
    iid_spread = np.abs(client_means(iid_tr)[:, 0]).max()
    non_spread = np.abs(client_means(non_tr)[:, 0]).max()
    assert iid_spread < 0.7
    assert non_spread > 1.0

    # IID: one global (W, b) and one input distribution, so every client's label histogram is
    # a sample of the same distribution; non-IID clients' label mixes differ wildly.
    def mean_label_tv(d):
        pooled = np.bincount(d.features["y"], minlength=10) / d.total_examples
        return np.mean([
            0.5 * np.abs(np.bincount(d.client(i)["y"], minlength=10) / d.num_examples[i]
                         - pooled).sum()
            for i in range(d.num_clients)])

    assert mean_label_tv(iid_tr) < 0.2
    assert mean_label_tv(non_tr) > 0.5


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="num_clients"):
        synthetic(num_clients=0)
    with pytest.raises(ValueError, match="test_fraction"):
        synthetic(num_clients=2, test_fraction=1.0)


# -- cohort packing --------------------------------------------------------------------------
SIZES = (7, 23, 1, 12, 40, 5, 16, 3)


def make_data(sizes=SIZES):
    """Clients whose x[:, 0] is the population row (so gathered rows can be read back)."""
    clients, row = {}, 0
    for i, n in enumerate(sizes):
        x = np.zeros((n, 3), np.float32)
        x[:, 0] = np.arange(row, row + n)
        x[:, 1] = i
        clients[f"c{i}"] = {"x": x, "y": np.full(n, i % 4, np.int32)}
        row += n
    return from_client_dict(clients)


def pack(data, indices, batching, cohort_size=None, *, seed=0, round_num=0, multiple=1,
         sort=True):
    shape = CohortShape.for_population(data, batching, cohort_size or len(indices), multiple)
    cohort, rows = pack_cohort(data, np.asarray(indices), batching, shape, seed=seed,
                               round_num=round_num, sort=sort)
    return cohort, rows, shape


def client_rows(cohort, rows, i):
    """Population rows client i of the cohort reads, in order."""
    s, n = int(cohort.start[i]), int(cohort.length[i])
    return rows[cohort.order[s:s + n]]


@pytest.mark.parametrize("num_epochs", [1, 3])
@pytest.mark.parametrize("batch_size", [4, 10])
def test_each_epoch_covers_each_example_once(num_epochs, batch_size):
    data = make_data()
    indices = np.arange(data.num_clients)
    batching = Batching(batch_size=batch_size, num_epochs=num_epochs)
    cohort, rows, _ = pack(data, indices, batching)
    for i, cid in enumerate(cohort.client_ids[: len(indices)]):
        n = int(data.num_examples[cid])
        lo = int(data.offsets[cid])
        assert cohort.length[i] == n * num_epochs
        assert cohort.num_steps[i] == -(-n * num_epochs // batch_size)
        got = client_rows(cohort, rows, i)
        for e in range(num_epochs):
            epoch = got[e * n:(e + 1) * n]
            assert sorted(epoch.tolist()) == list(range(lo, lo + n))


def test_length_capped_by_max_steps_and_drop_remainder():
    data = make_data()
    indices = np.arange(data.num_clients)
    b, e, max_steps = 4, 3, 5
    cohort, rows, _ = pack(data, indices, Batching(batch_size=b, num_epochs=e,
                                                   max_steps=max_steps))
    for i, cid in enumerate(cohort.client_ids[: len(indices)]):
        n = int(data.num_examples[cid])
        length = min(n * e, max_steps * b)
        assert cohort.length[i] == length
        assert cohort.num_steps[i] == -(-length // b)
        got = client_rows(cohort, rows, i)
        # Full epochs within the cut are complete permutations; the rest is a prefix of one.
        for start in range(0, length, n):
            chunk = got[start:start + n].tolist()
            assert len(set(chunk)) == len(chunk)
            assert set(chunk) <= set(range(int(data.offsets[cid]), int(data.offsets[cid]) + n))

    cohort, _, _ = pack(data, indices, Batching(batch_size=b, num_epochs=e, max_steps=max_steps,
                                                drop_remainder=True))
    for i, cid in enumerate(cohort.client_ids[: len(indices)]):
        n = int(data.num_examples[cid])
        length = min(n * e, max_steps * b)
        assert cohort.num_steps[i] == length // b
        assert cohort.length[i] == (length // b) * b


def test_max_examples_per_client_uses_first_examples_and_weights():
    data = make_data()
    indices = np.arange(data.num_clients)
    cap = 6
    cohort, rows, _ = pack(data, indices, Batching(batch_size=4, max_examples_per_client=cap))
    for i, cid in enumerate(cohort.client_ids[: len(indices)]):
        n = min(int(data.num_examples[cid]), cap)
        lo = int(data.offsets[cid])
        assert cohort.num_examples[i] == n
        assert cohort.weights[i] == 1  # a client that trains; weighting is the aggregator's
        assert sorted(client_rows(cohort, rows, i).tolist()) == list(range(lo, lo + n))


def test_weights_mark_the_clients_that_train():
    data = make_data()
    cohort, _, _ = pack(data, [0, 4, 2], Batching(batch_size=4), cohort_size=3, multiple=4)
    np.testing.assert_array_equal(cohort.weights, [1, 1, 1, 0])


def test_unsorted_packing_keeps_the_given_client_order():
    data = make_data()
    order = [4, 0, 2, 5]
    cohort, _, _ = pack(data, order, Batching(batch_size=4), sort=False)
    np.testing.assert_array_equal(cohort.client_ids[:4], order)
    assert np.any(np.diff(cohort.num_steps[:4]) > 0)  # not sorted by steps


def test_shuffle_depends_on_seed_round_and_client_only():
    data = make_data()
    batching = Batching(batch_size=5, num_epochs=2)
    target = 6  # 16 examples: second behind client 4 in cohort a, first in cohort b
    a, rows_a, _ = pack(data, [0, target, 4], batching, cohort_size=5, seed=7, round_num=3)
    b, rows_b, _ = pack(data, [target, 0, 2, 5], batching, cohort_size=5, seed=7, round_num=3)
    pos_a = int(np.nonzero(a.client_ids == target)[0][0])
    pos_b = int(np.nonzero(b.client_ids == target)[0][0])
    assert (pos_a, pos_b) == (1, 0)
    seq_a = client_rows(a, rows_a, pos_a)
    seq_b = client_rows(b, rows_b, pos_b)
    # Different co-members and positions but the same client, seed and round: same sequence,
    # both as population rows and relative to the client's place in the pool.
    np.testing.assert_array_equal(seq_a, seq_b)
    rel_a = a.order[a.start[pos_a]:a.start[pos_a] + a.length[pos_a]] - 40  # client 4 first
    rel_b = b.order[b.start[pos_b]:b.start[pos_b] + b.length[pos_b]]
    np.testing.assert_array_equal(rel_a, rel_b)
    n = 16
    # It is shuffled: not the natural order.
    lo = int(data.offsets[target])
    natural = np.tile(np.arange(lo, lo + n), 2)
    assert not np.array_equal(seq_a, natural)
    # The two epochs are different permutations.
    assert not np.array_equal(seq_a[:n], seq_a[n:])

    c, rows_c, _ = pack(data, [0, target, 4], batching, cohort_size=5, seed=7, round_num=4)
    seq_c = client_rows(c, rows_c, int(np.nonzero(c.client_ids == target)[0][0]))
    assert sorted(seq_c[:n].tolist()) == sorted(seq_a[:n].tolist())
    assert not np.array_equal(seq_c[:n], seq_a[:n])

    d, rows_d, _ = pack(data, [0, target, 4], batching, cohort_size=5, seed=8, round_num=3)
    seq_d = client_rows(d, rows_d, int(np.nonzero(d.client_ids == target)[0][0]))
    assert not np.array_equal(seq_d, seq_a)

    # Packing again is deterministic.
    a2, rows_a2, _ = pack(data, [0, target, 4], batching, cohort_size=5, seed=7, round_num=3)
    np.testing.assert_array_equal(a2.order, a.order)
    np.testing.assert_array_equal(rows_a2, rows_a)


@pytest.mark.parametrize("num_segments", [1, 2, 7, 3000])
def test_argsort_within_sorts_each_segment_by_key(num_segments):
    rng = np.random.default_rng(num_segments)
    segment = np.sort(rng.integers(0, num_segments, 5000))
    key = rng.integers(0, 2**63, 5000, dtype=np.uint64) * np.uint64(2)
    key[:40] = key[40:80]  # equal keys keep their order
    perm = _argsort_within(segment, key, num_segments)
    np.testing.assert_array_equal(np.sort(perm), np.arange(5000))  # a permutation
    np.testing.assert_array_equal(segment[perm], segment)  # nothing leaves its segment
    bits = max(int(num_segments - 1).bit_length(), 1)
    np.testing.assert_array_equal(perm, np.lexsort((key >> np.uint64(bits), segment)))


def test_no_shuffle_gives_natural_order():
    data = make_data()
    cohort, rows, _ = pack(data, [3, 1, 6], Batching(batch_size=5, num_epochs=2, shuffle=False))
    for i, cid in enumerate(cohort.client_ids[:3]):
        n, lo = int(data.num_examples[cid]), int(data.offsets[cid])
        np.testing.assert_array_equal(client_rows(cohort, rows, i),
                                      np.tile(np.arange(lo, lo + n), 2))


def test_sorted_by_steps_and_padding():
    data = make_data()
    indices = [2, 0, 4, 5, 1]
    cohort, rows, shape = pack(data, indices, Batching(batch_size=4), cohort_size=5, multiple=4)
    assert shape.size == 8
    assert all(len(x) == 8 for x in (cohort.start, cohort.length, cohort.num_steps,
                                     cohort.num_examples, cohort.weights, cohort.client_ids))
    real = cohort.client_ids[:5]
    assert sorted(real.tolist()) == sorted(indices)
    steps = cohort.num_steps
    assert np.all(np.diff(steps) <= 0)  # descending, padding (0 steps) last
    np.testing.assert_array_equal(cohort.num_examples[:5], data.num_examples[real])
    np.testing.assert_array_equal(cohort.weights[:5], 1)
    # Padding: weight 0, no steps, ids out of range (never -1), distinct.
    pad = slice(5, 8)
    assert np.all(cohort.weights[pad] == 0)
    assert np.all(cohort.num_steps[pad] == 0)
    assert np.all(cohort.length[pad] == 0)
    assert np.all(cohort.num_examples[pad] == 0)
    assert np.all(cohort.client_ids[pad] >= data.num_clients)
    assert np.all(cohort.client_ids >= 0)
    assert len(set(cohort.client_ids.tolist())) == 8
    # Starts are the running sum of lengths.
    lengths = cohort.length[:5]
    np.testing.assert_array_equal(cohort.start[:5], np.cumsum(lengths) - lengths)
    # `rows` concatenates the clients' rows in cohort order.
    np.testing.assert_array_equal(rows, rows_of(data.offsets, real.astype(np.int64)))


def test_cohort_too_large_for_shape():
    data = make_data()
    batching = Batching(batch_size=4)
    shape = CohortShape.for_population(data, batching, 2)
    with pytest.raises(ValueError, match="does not fit"):
        pack_cohort(data, np.arange(3), batching, shape, seed=0, round_num=0)
    with pytest.raises(ValueError, match="cohort_size"):
        CohortShape.for_population(data, batching, 0)


def test_resident_order_matches_host_pool():
    data = make_data()
    batching = Batching(batch_size=4, num_epochs=2)
    indices = [5, 1, 7, 4]
    cohort, rows, shape = pack(data, indices, batching, cohort_size=4, seed=3, round_num=2)
    pool = host_pool(data, rows, shape)
    assert pool["x"].shape == (shape.pool_capacity, 3)
    resident = resident_order(cohort, rows)
    assert resident.order.shape == cohort.order.shape
    for i in range(len(indices)):
        s, n = int(cohort.start[i]), int(cohort.length[i])
        for k in ("x", "y"):
            np.testing.assert_array_equal(data.features[k][resident.order[s:s + n]],
                                          pool[k][cohort.order[s:s + n]])
        # And the gathered examples are the client's own.
        assert np.all(pool["x"][cohort.order[s:s + n], 1] == cohort.client_ids[i])
    # Everything but the order is unchanged.
    for name in ("start", "length", "num_steps", "num_examples", "weights", "client_ids"):
        np.testing.assert_array_equal(getattr(resident, name), getattr(cohort, name))


@pytest.mark.parametrize("batching", [
    Batching(batch_size=4),
    Batching(batch_size=3, num_epochs=3),
    Batching(batch_size=5, num_epochs=2, max_steps=3),
    Batching(batch_size=None),
    Batching(batch_size=4, max_examples_per_client=10),
    Batching(batch_size=4, drop_remainder=True),
])
def test_cohort_shape_fits_worst_case_and_is_fixed(batching):
    data = make_data()
    cohort_size = 3
    shape = CohortShape.for_population(data, batching, cohort_size)
    assert shape.batch_size == (batching.batch_size or max(batching.examples_used(
        data.num_examples)))
    largest = np.argsort(-data.num_examples, kind="stable")[:cohort_size]
    shapes = set()
    rng = np.random.default_rng(0)
    for indices in [largest, np.argsort(data.num_examples)[:cohort_size],
                    *(rng.choice(data.num_clients, cohort_size, replace=False) for _ in range(5))]:
        cohort, rows = pack_cohort(data, indices, batching, shape, seed=1, round_num=0)
        used = int(cohort.length.sum())
        assert used <= shape.order_capacity
        # The last client's last batch may read up to B entries past its length.
        last = int(np.max(cohort.start + cohort.num_steps * shape.batch_size))
        assert last <= shape.order_capacity
        assert len(rows) <= shape.pool_capacity
        pool = host_pool(data, rows, shape)
        shapes.add((cohort.order.shape, cohort.start.shape, pool["x"].shape))
    assert len(shapes) == 1


def test_client_with_no_full_batch_gets_weight_zero_under_drop_remainder():
    data = make_data()
    cohort, _, _ = pack(data, np.arange(len(SIZES)), Batching(batch_size=6, drop_remainder=True))
    n = cohort.num_examples[: len(SIZES)]
    steps = cohort.num_steps[: len(SIZES)]
    weights = cohort.weights[: len(SIZES)]
    assert np.any(n < 6)  # clients of 1, 3 and 5 examples cannot fill one batch of 6
    np.testing.assert_array_equal(weights[n < 6], 0)
    np.testing.assert_array_equal(steps[n < 6], 0)
    np.testing.assert_array_equal(weights[n >= 6], 1)


def test_split_is_per_client_seeded_and_keeps_a_train_example():
    data = make_data()
    train, test = data.split(0.3, seed=4)
    again_train, _ = data.split(0.3, seed=4)
    other_train, _ = data.split(0.3, seed=5)
    np.testing.assert_array_equal(train.features["x"], again_train.features["x"])
    assert not np.array_equal(train.features["x"], other_train.features["x"])
    np.testing.assert_array_equal(train.client_ids, data.client_ids)
    assert np.all(train.num_examples >= 1)
    expected_test = np.minimum(np.round(0.3 * np.array(SIZES)), np.array(SIZES) - 1)
    assert test.num_clients == int(np.sum(expected_test > 0))  # a 1-example client has none
    np.testing.assert_array_equal(test.num_examples, expected_test[expected_test > 0])
    for cid in data.client_ids:
        rows = set(data.get_clients([cid])[cid]["x"][:, 0].tolist())
        got = set(train.get_clients([cid])[cid]["x"][:, 0].tolist())
        if cid in test.client_ids:
            got_test = set(test.get_clients([cid])[cid]["x"][:, 0].tolist())
            assert not got & got_test
            got |= got_test
        assert got == rows  # every example in exactly one side, still with its own client


@pytest.mark.parametrize("jit", [False, True])
def test_map_runs_in_batches_and_keeps_clients(jit):
    data = make_data()
    mapped = data.map(lambda f: {"x": f["x"][:, :2] * 2.0, "z": f["y"] + 1}, batch_size=7,
                      jit=jit)
    np.testing.assert_array_equal(mapped.offsets, data.offsets)
    np.testing.assert_allclose(mapped.features["x"], data.features["x"][:, :2] * 2.0)
    np.testing.assert_array_equal(mapped.features["z"], data.features["y"] + 1)
    with pytest.raises(ValueError, match="one row per example"):
        data.map(lambda f: {"x": f["x"][:1]}, batch_size=7)


def test_stragglers_do_a_seeded_uniform_share_of_the_epochs():
    """FedProx's systems heterogeneity: each client is a straggler with probability p, seeded
    by (seed, round, client id), and then runs a uniform number of epochs in [1, E]."""
    data = make_data()
    indices = np.arange(data.num_clients)
    full = Batching(batch_size=1, num_epochs=5, shuffle=False)
    half = Batching(batch_size=1, num_epochs=5, shuffle=False, straggler_fraction=0.5)
    dropped = Batching(batch_size=1, num_epochs=5, shuffle=False, straggler_fraction=0.5,
                       drop_stragglers=True)
    seen_straggler = 0
    for r in range(20):
        a, _, _ = pack(data, indices, full, round_num=r, sort=False)
        b, _, _ = pack(data, indices, half, round_num=r, sort=False)
        c, _, _ = pack(data, indices, dropped, round_num=r, sort=False)
        epochs = b.num_steps[: len(indices)] / a.num_examples[: len(indices)]
        assert np.all((epochs >= 1) & (epochs <= 5) & (epochs == np.round(epochs)))
        slow = epochs < 5
        seen_straggler += slow.sum()
        np.testing.assert_array_equal(b.weights[: len(indices)], 1)  # kept
        kept = c.weights[: len(indices)] > 0  # a straggler drawing all 5 epochs is dropped too
        assert np.all(epochs[kept] == 5) and not np.any(kept[slow])
        again, _, _ = pack(data, indices, half, round_num=r, sort=False)
        np.testing.assert_array_equal(again.num_steps, b.num_steps)  # seeded
    assert 0.2 < seen_straggler / (20 * len(indices)) < 0.6  # about p (4/5 of them slowed)
    with pytest.raises(ValueError, match=r"straggler_fraction must be a number in \[0, 1\]"):
        Batching(straggler_fraction=1.5)
