"""Partitioners: exact coverage, seeding, the skew each one promises, statistics and the plot."""

import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.data import partition as P

N, C = 1200, 10


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    # Unequal class sizes, so no partitioner can rely on balance; "row" tracks identity.
    y = rng.choice(C, size=N, p=np.linspace(1, 3, C) / np.linspace(1, 3, C).sum())
    return {"x": rng.normal(size=(N, 4)).astype(np.float32), "y": y,
            "row": np.arange(N)}


PARTITIONERS = {
    "iid": lambda a, seed: P.iid(a, 40, seed=seed),
    "dirichlet": lambda a, seed: P.dirichlet(a, 40, 0.3, seed=seed),
    "lognormal": lambda a, seed: P.quantity_skew(a, 40, sigma=1.5, seed=seed),
    "power_law": lambda a, seed: P.quantity_skew(a, 40, distribution="power_law", seed=seed),
    "shards": lambda a, seed: P.shards(a, 40, 2, seed=seed),
}


@pytest.mark.parametrize("name", PARTITIONERS)
def test_every_example_exactly_once_and_seeded(arrays, name):
    make = PARTITIONERS[name]
    data = make(arrays, 0)
    rows = data.features["row"]
    np.testing.assert_array_equal(np.sort(rows), np.arange(N))
    # Every column moved together, and each client keeps its examples in input order.
    np.testing.assert_array_equal(data.features["x"], arrays["x"][rows])
    np.testing.assert_array_equal(data.features["y"], arrays["y"][rows])
    for i in range(data.num_clients):
        assert np.all(np.diff(data.client(i)["row"]) > 0)
    assert data.num_examples.min() >= 1
    assert data.client_ids[0] == "client_00000" and data.client_ids[-1] == "client_00039"

    again, other = make(arrays, 0), make(arrays, 1)
    np.testing.assert_array_equal(again.offsets, data.offsets)
    np.testing.assert_array_equal(again.features["row"], rows)
    assert not np.array_equal(other.features["row"], rows)


def test_iid_sizes_are_even_and_mixes_near_global(arrays):
    stats = P.statistics(P.iid(arrays, 40, seed=0))
    assert stats["size_max"] - stats["size_min"] <= 1
    assert stats["mean_label_tv"] < 0.3


def test_smaller_alpha_is_more_skewed(arrays):
    tv = {a: P.statistics(P.dirichlet(arrays, 20, a, seed=0))["mean_label_tv"]
          for a in (0.1, 1.0, 100.0)}
    assert tv[0.1] > tv[1.0] > tv[100.0]
    assert tv[0.1] > 0.5 and tv[100.0] < 0.15


def test_dirichlet_min_size_is_respected_or_raises(arrays):
    data = P.dirichlet(arrays, 20, 0.1, min_size=10, seed=0)
    assert data.num_examples.min() >= 10
    # With alpha 0.01 each class lands almost whole on one client: 40 non-empty clients
    # out of 10 classes is hopeless, so this must stop with advice rather than loop.
    with pytest.raises(ValueError, match="no draw .* lower min_size"):
        P.dirichlet(arrays, 40, 0.01, seed=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_bound_classes_per_client(arrays, k):
    data = P.shards(arrays, 30, k, seed=0)
    stats = P.statistics(data)
    assert stats["classes_per_client"].max() <= k
    assert stats["mean_classes_per_client"] > 0.7 * k  # shards rarely repeat a class
    # Shards are as even as whole shards per class allow: within a factor 2 (plus rounding).
    assert stats["size_max"] <= 2 * stats["size_min"] + k


def test_quantity_skew_is_heavy_tailed(arrays):
    iid = P.statistics(P.iid(arrays, 60, seed=0))
    for kwargs in ({"sigma": 1.5}, {"distribution": "power_law", "exponent": 1.2}):
        skew = P.statistics(P.quantity_skew(arrays, 60, seed=0, **kwargs))
        # A few large clients and many small ones: a long right tail, unlike iid's flat sizes.
        assert skew["size_max"] > 4 * skew["size_mean"]
        assert np.median(skew["sizes"]) < 0.8 * skew["size_mean"]
        assert skew["size_std"] > 10 * iid["size_std"] + 1


def test_natural_reproduces_groups():
    rng = np.random.default_rng(1)
    writer = rng.choice(np.array([7, 3, 11, 42]), size=50)
    feats = {"x": np.arange(50, dtype=np.float32), "writer": writer, "y": np.arange(50) % 3}
    data = P.natural(feats, "writer")
    assert "writer" not in data.features
    assert data.client_ids.tolist() == [str(w) for w in dict.fromkeys(writer.tolist())]
    for cid in data.client_ids:
        got = data.get_clients([cid])[cid]["x"]
        np.testing.assert_array_equal(got, feats["x"][writer == int(cid)])


def test_statistics_exact_values():
    data = fs.data.from_arrays(["a", "a", "b", "b", "b", "b"],
                               {"y": np.array([0, 1, 0, 0, 0, 0])})
    stats = P.statistics(data, num_classes=3)
    np.testing.assert_array_equal(stats["label_histogram"], [[1, 1, 0], [4, 0, 0]])
    np.testing.assert_array_equal(stats["classes_per_client"], [2, 1])
    # Global mix (5/6, 1/6, 0): TV of (1/2, 1/2, 0) is 1/3, of (1, 0, 0) is 1/6.
    np.testing.assert_allclose(stats["label_tv"], [1 / 3, 1 / 6])
    assert (stats["size_min"], stats["size_max"], stats["size_mean"]) == (2, 4, 3.0)
    with pytest.raises(ValueError, match="outside"):
        P.statistics(data, num_classes=1)


def test_bad_arguments_give_clear_errors(arrays):
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        P.dirichlet(arrays, 10, 0.0)
    with pytest.raises(ValueError, match="more than the examples allow"):
        P.iid(arrays, N + 1)
    with pytest.raises(ValueError, match="positive integer"):
        P.iid(arrays, 0)
    with pytest.raises(ValueError, match="no label column 'label'"):
        P.shards(arrays, 10, label="label")
    with pytest.raises(ValueError, match="cannot cover the 10 classes"):
        P.shards(arrays, 4, 2)
    with pytest.raises(ValueError, match="'lognormal' or 'power_law'"):
        P.quantity_skew(arrays, 10, distribution="zipf")
    with pytest.raises(ValueError, match="no id column 'user'"):
        P.natural(arrays, "user")
    with pytest.raises(ValueError, match="mismatched lengths"):
        P.iid({"x": np.zeros(5), "y": np.zeros(4)}, 2)
    with pytest.raises(TypeError, match="dict of numpy arrays"):
        P.iid([1, 2, 3], 2)


def test_plot_statistics_saves_png(arrays, tmp_path):
    pytest.importorskip("matplotlib")
    fig = P.plot_statistics(P.dirichlet(arrays, 80, 0.5, seed=0))
    assert len(fig.axes[1].patches) == 50 * C  # capped at max_clients rows of stacked bars
    path = tmp_path / "stats.png"
    fig.savefig(path)
    assert path.stat().st_size > 1000


def test_hugging_face_dataset_matches_dict(arrays):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({k: v.tolist() for k, v in arrays.items()})
    a, b = P.dirichlet(ds, 10, 0.5, seed=0), P.dirichlet(arrays, 10, 0.5, seed=0)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.features["row"], b.features["row"])


def test_digits_partition_trains_end_to_end():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    arrays = {"x": (x / 16.0).astype(np.float32), "y": y.astype(np.int32)}
    train = P.dirichlet(arrays, 20, 0.5, seed=0)
    assert train.total_examples == len(y)
    model = fs.models.logistic_regression(64, 10)
    algo = fs.algorithms.fedavg(model, optax.sgd(0.5), batch_size=16)
    result = fs.simulate(algo, train, rounds=3, cohort_size=5, chunk_size=1, progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert np.all(np.isfinite(losses))
    before = fs.evaluate_pooled(model, model.init(None), train)["loss"]
    after = fs.evaluate_pooled(model, result.params, train)["loss"]
    assert after < 0.8 * before
