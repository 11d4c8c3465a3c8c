"""Bad inputs fail early with an error that names the problem; a diverging client is excluded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import cli
from fedjax_sim.data import from_arrays, from_client_dict
from fedjax_sim.simulate import sample_cohort

NUM_FEATURES, NUM_CLASSES = 5, 3


def clients_dict(sizes=(4, 6, 3), seed=0):
    rng = np.random.default_rng(seed)
    return {f"c{i}": {"x": rng.normal(size=(n, NUM_FEATURES)).astype(np.float32),
                      "y": rng.integers(0, NUM_CLASSES, n).astype(np.int32)}
            for i, n in enumerate(sizes)}


def model():
    return fs.models.logistic_regression(NUM_FEATURES, NUM_CLASSES)


def algo(**kwargs):
    kwargs.setdefault("batch_size", 2)
    return fs.algorithms.fedavg(model(), optax.sgd(0.1), **kwargs)


# -- data construction -----------------------------------------------------------------------
def test_from_arrays_mismatched_feature_lengths():
    with pytest.raises(ValueError, match="mismatched lengths"):
        from_arrays(["a"] * 4, {"x": np.zeros((4, 2)), "y": np.zeros(3)})


def test_from_arrays_scalar_feature():
    with pytest.raises(ValueError, match="mismatched lengths"):
        from_arrays(["a"] * 4, {"x": np.zeros((4, 2)), "y": np.float32(1.0)})


def test_from_client_dict_mismatched_feature_lengths():
    clients = clients_dict()
    clients["c1"]["y"] = clients["c1"]["y"][:-1]
    with pytest.raises(ValueError, match=r"client 'c1'.*mismatched lengths"):
        from_client_dict(clients)


def test_from_client_dict_different_feature_names():
    clients = clients_dict()
    clients["c2"]["z"] = clients["c2"].pop("y")
    with pytest.raises(ValueError, match=r"client 'c2' has features \['x', 'z'\]"):
        from_client_dict(clients)


def test_client_ids_length_mismatch():
    with pytest.raises(ValueError, match="client_ids has shape"):
        from_arrays(["a", "b"], {"x": np.zeros((3, 2)), "y": np.zeros(3)})


def test_no_examples_or_features():
    with pytest.raises(ValueError, match="no examples"):
        from_arrays([], {"x": np.zeros((0, 2))})
    with pytest.raises(ValueError, match="no features"):
        from_arrays(["a"], {})
    with pytest.raises(ValueError, match="no clients"):
        from_client_dict({})


def test_empty_client_skipped_with_warning():
    clients = clients_dict()
    clients["empty"] = {"x": np.zeros((0, NUM_FEATURES), np.float32),
                        "y": np.zeros(0, np.int32)}
    with pytest.warns(UserWarning, match=r"zero examples.*'empty'"):
        data = from_client_dict(clients)
    assert data.client_ids.tolist() == ["c0", "c1", "c2"]
    assert data.num_examples.tolist() == [4, 6, 3]
    np.testing.assert_array_equal(data.client(1)["x"], clients["c1"]["x"])


def test_all_clients_empty():
    clients = {c: {"x": np.zeros((0, 2), np.float32), "y": np.zeros(0, np.int32)}
               for c in ("a", "b")}
    with pytest.raises(ValueError, match="all 2 clients have zero examples"):
        from_client_dict(clients)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_data(bad):
    clients = clients_dict()
    clients["c1"]["x"][2, 3] = bad
    with pytest.raises(ValueError, match=r"client 'c1'.*feature 'x'.*non-finite"):
        from_client_dict(clients)
    x = np.ones((5, 2), np.float32)
    x[3, 0] = bad
    with pytest.raises(ValueError, match=r"feature 'pixels'.*non-finite.*example 3"):
        from_arrays(["a", "a", "b", "b", "b"], {"pixels": x, "y": np.zeros(5, np.int32)})


def test_object_dtype_feature():
    with pytest.raises(ValueError, match="feature 'x' has dtype object"):
        from_arrays(["a", "b"], {"x": np.array([[1], "a"], dtype=object)})


# -- labels vs model -------------------------------------------------------------------------
@pytest.mark.parametrize("bad_label", [NUM_CLASSES, -1])
def test_labels_out_of_range(bad_label):
    clients = clients_dict()
    clients["c2"]["y"][1] = bad_label
    data = from_client_dict(clients)
    with pytest.raises(ValueError, match=rf"labels out of range.*'y'.*{bad_label}.*'c2'"):
        fs.simulate(algo(), data, rounds=1, cohort_size=2, chunk_size=1, progress=False)
    with pytest.raises(ValueError, match=r"labels out of range.*'c2'"):
        fs.evaluate(model(), model().init(jax.random.key(0)), data)
    with pytest.raises(ValueError, match=r"labels out of range"):
        fs.evaluate_pooled(model(), model().init(jax.random.key(0)), data)


def test_eval_data_labels_checked_at_simulate_start():
    train = from_client_dict(clients_dict())
    bad = clients_dict(seed=1)
    bad["c0"]["y"][0] = NUM_CLASSES + 5
    with pytest.raises(ValueError, match="labels out of range"):
        fs.simulate(algo(), train, rounds=1, cohort_size=2, chunk_size=1, progress=False,
                    eval_data=from_client_dict(bad), eval_every=1)


def test_missing_label_feature():
    clients = {c: {"x": f["x"], "label": f["y"]} for c, f in clients_dict().items()}
    data = from_client_dict(clients)
    with pytest.raises(ValueError, match="no label feature 'y'"):
        fs.simulate(algo(), data, rounds=1, cohort_size=2, chunk_size=1, progress=False)


# -- simulation arguments --------------------------------------------------------------------
def test_cohort_larger_than_population():
    data = from_client_dict(clients_dict())
    with pytest.raises(ValueError, match="cohort_size 4 is larger than the population of 3"):
        fs.simulate(algo(), data, rounds=1, cohort_size=4, chunk_size=1, progress=False)
    with pytest.raises(ValueError, match="cohort_size"):
        fs.simulate(algo(), data, rounds=1, cohort_size=0, chunk_size=1, progress=False)
    with pytest.raises(ValueError, match="larger than the population"):
        sample_cohort(3, 4, 0, 0)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match=rf"batch_size must be an integer >= 1.*{batch_size}"):
        fs.algorithms.fedavg(model(), optax.sgd(0.1), batch_size=batch_size)


def test_bad_batching_arguments():
    with pytest.raises(ValueError, match="num_epochs"):
        fs.algorithms.fedavg(model(), optax.sgd(0.1), num_epochs=0)
    with pytest.raises(ValueError, match="max_steps"):
        fs.algorithms.fedavg(model(), optax.sgd(0.1), max_steps=0)
    with pytest.raises(ValueError, match="max_examples_per_client"):
        fs.algorithms.fedavg(model(), optax.sgd(0.1), max_examples_per_client=0)
    with pytest.raises(ValueError, match="client_weighting"):
        fs.algorithms.fedavg(model(), optax.sgd(0.1), client_weighting="size")


@pytest.mark.parametrize("lr", [np.nan, np.inf])
def test_non_finite_learning_rate(lr):
    with pytest.raises(ValueError, match="client_optimizer.*non-finite.*learning rate"):
        fs.algorithms.fedavg(model(), optax.sgd(lr))
    with pytest.raises(ValueError, match="client_optimizer.*non-finite"):
        fs.algorithms.fedavg(model(), lambda r: optax.sgd(lr))
    with pytest.raises(ValueError, match="server_optimizer.*non-finite.*learning rate"):
        fs.algorithms.fedavg(model(), optax.sgd(0.1), optax.sgd(lr))
    with pytest.raises(ValueError, match="server_optimizer.*non-finite"):
        fs.algorithms.fedavg(model(), optax.sgd(0.1), fs.algorithms.fedadam(lr))
    # Finite ones are accepted.
    assert fs.algorithms.fedavg(model(), optax.sgd(0.1), optax.sgd(1.0)) is not None


def test_loss_not_per_example():
    base = model()
    mean_loss = base._replace(loss=lambda p, b, k: jnp.mean(base.loss(p, b, k)))
    algorithm = fs.algorithms.fedavg(mean_loss, optax.sgd(0.1), batch_size=2)
    data = from_client_dict(clients_dict())
    with pytest.raises(ValueError, match=r"one value per example.*got \(\)"):
        fs.simulate(algorithm, data, rounds=1, cohort_size=2, chunk_size=1, progress=False)


def test_loss_that_fails_on_the_data():
    bad = fs.models.logistic_regression(NUM_FEATURES + 1, NUM_CLASSES)  # wrong input width
    algorithm = fs.algorithms.fedavg(bad, optax.sgd(0.1), batch_size=2)
    data = from_client_dict(clients_dict())
    with pytest.raises(ValueError, match="model.loss failed on a batch"):
        fs.simulate(algorithm, data, rounds=1, cohort_size=2, chunk_size=1, progress=False)


def test_metrics_not_per_example():
    base = model()
    bad = base._replace(metrics=lambda p, b: {k: jnp.mean(v) for k, v in
                                              base.metrics(p, b).items()})
    data = from_client_dict(clients_dict())
    with pytest.raises(ValueError, match="one value per example"):
        fs.evaluate(bad, bad.init(jax.random.key(0)), data)
    no_loss = base._replace(metrics=lambda p, b: {"accuracy": base.metrics(p, b)["accuracy"]})
    with pytest.raises(ValueError, match="'loss' entry"):
        fs.evaluate(no_loss, no_loss.init(jax.random.key(0)), data)


def test_metrics_that_fail_on_the_data():
    renamed = {c: {"pixels": f["x"], "y": f["y"]} for c, f in clients_dict().items()}
    data = from_client_dict(renamed)
    params = model().init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"model.metrics failed.*'pixels'.*KeyError\('x'\)"):
        fs.evaluate(model(), params, data)
    with pytest.raises(ValueError, match="model.metrics failed"):
        fs.evaluate_pooled(model(), params, data)
    wrong = {"w": jnp.zeros((NUM_FEATURES + 2, NUM_CLASSES)), "b": jnp.zeros(NUM_CLASSES)}
    with pytest.raises(ValueError, match="model.metrics failed on one example"):
        fs.evaluate(model(), wrong, from_client_dict(clients_dict()))


def test_from_nnx_rejects_non_param_state():
    from flax import nnx

    class WithDropout(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(NUM_FEATURES, NUM_CLASSES, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.linear(x))

    with pytest.raises(ValueError, match=r"all nnx.Param.*WithDropout.*drop/rngs.*RngKey"):
        fs.models.from_nnx(WithDropout(nnx.Rngs(0)), NUM_CLASSES)
    with pytest.raises(ValueError, match=r"BatchStat"):
        fs.models.from_nnx(nnx.BatchNorm(NUM_FEATURES, rngs=nnx.Rngs(0)), NUM_CLASSES)
    # Params only: accepted.
    assert fs.models.from_nnx(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), 3).label == ("y", 3)


def test_eval_every_without_eval_data():
    data = from_client_dict(clients_dict())
    with pytest.raises(ValueError, match="eval_every is set but no eval_data"):
        fs.simulate(algo(), data, rounds=1, cohort_size=2, eval_every=1, chunk_size=1,
                    progress=False)


def test_negative_rounds():
    data = from_client_dict(clients_dict())
    with pytest.raises(ValueError, match="rounds must be >= 0"):
        fs.simulate(algo(), data, rounds=-1, cohort_size=2, chunk_size=1, progress=False)


# -- command line ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["run", "--client-lr", "nan"], "--client-lr: must be a finite number"),
    (["run", "--server-lr", "inf"], "--server-lr: must be a finite number"),
    (["run", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["run", "--batch-size", "-1"], "--batch-size: must be >= 1"),
    (["run", "--cohort-size", "0"], "--cohort-size: must be >= 1"),
    (["run", "--client-lr", "fast"], "--client-lr"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# -- a diverging client ----------------------------------------------------------------------
def test_diverging_client_is_excluded():
    clients = clients_dict(sizes=(8, 12, 10, 6), seed=3)
    clients["c1"]["x"][:, 0] = 1e30  # finite, so the data checks pass; training overflows
    data = from_client_dict(clients)
    algorithm = fs.algorithms.fedavg(model(), optax.sgd(0.5), batch_size=3)
    with pytest.warns(UserWarning, match=r"excluded 1 client\(s\) with non-finite.*'c1'"):
        result = fs.simulate(algorithm, data, rounds=2, cohort_size=4, chunk_size=1, seed=0,
                             progress=False)
    for record in result.history:  # cohort 4 of 4: c1 trains every round
        assert record["num_excluded"] == 1
        assert record["excluded_clients"] == ["c1"]
        assert record["num_included"] == 3
        assert np.isfinite(record["train_loss"])
        finite = dict(zip(record["clients"]["client_id"], record["clients"]["finite"],
                          strict=True))
        assert finite == {"c0": True, "c1": False, "c2": True, "c3": True}
    for leaf in jax.tree.leaves(result.params):
        assert np.all(np.isfinite(leaf))
    # The healthy clients still moved the model.
    assert np.any(result.params["w"] != 0)


@pytest.mark.parametrize("seed", [-1, 1.5])
def test_bad_seed(seed):
    train = from_client_dict(clients_dict())
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        fs.simulate(algo(), train, rounds=1, cohort_size=2, seed=seed, progress=False)
