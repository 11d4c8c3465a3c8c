"""Bad inputs fail early with an error that names the problem; a diverging client is excluded."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim import cli
from fedjax_sim.data import from_arrays, from_client_dict
from fedjax_sim.sampling import sample_cohort

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
    with pytest.raises(ValueError, match=r"feature 'y' is a scalar.*one row per example"):
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
    with pytest.raises(ValueError, match=rf"batch_size must be >= 1, got {batch_size}"):
        fs.algorithms.fedavg(model(), optax.sgd(0.1), batch_size=batch_size)
    with pytest.raises(TypeError, match=r"batch_size must be an integer, got 2.5"):
        fs.algorithms.fedavg(model(), optax.sgd(0.1), batch_size=2.5)


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
    bad = fs.models.from_function(  # wrong input width, and no input shape to check first
        lambda key: {"w": jnp.zeros((NUM_FEATURES + 1, NUM_CLASSES))}, lambda p, x: x @ p["w"],
        NUM_CLASSES)
    algorithm = fs.algorithms.fedavg(bad, optax.sgd(0.1), batch_size=2)
    data = from_client_dict(clients_dict())
    with pytest.raises(ValueError, match="model.loss failed on a batch"):
        fs.simulate(algorithm, data, rounds=1, cohort_size=2, chunk_size=1, progress=False)
    built_in = fs.algorithms.fedavg(fs.models.logistic_regression(NUM_FEATURES + 1, NUM_CLASSES),
                                    optax.sgd(0.1), batch_size=2)
    with pytest.raises(ValueError, match=r"feature 'x' has 5 value\(s\) per example \(shape "
                       r"\(5,\)\) but the model expects 6 \(shape \(6,\)\)$"):
        fs.simulate(built_in, data, rounds=1, cohort_size=2, chunk_size=1, progress=False)


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
    no_init = model()._replace(init=lambda key: None)  # nothing to check params against
    wrong = {"w": jnp.zeros((NUM_FEATURES + 2, NUM_CLASSES)), "b": jnp.zeros(NUM_CLASSES)}
    with pytest.raises(ValueError, match="model.metrics failed on one example"):
        fs.evaluate(no_init, wrong, from_client_dict(clients_dict()))


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


@pytest.mark.parametrize("seed, error, message", [
    (-1, ValueError, "seed must be >= 0, got -1"),
    (1.5, TypeError, r"seed must be an integer, got 1.5 \(float\)"),
])
def test_bad_seed(seed, error, message):
    train = from_client_dict(clients_dict())
    with pytest.raises(error, match=message):
        fs.simulate(algo(), train, rounds=1, cohort_size=2, seed=seed, progress=False)


# -- issue 15: every case a new user hit -----------------------------------------------------
def wide_clients(sizes=(6, 8, 5), features=60, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return {f"c{i}": {"x": rng.normal(size=(n, features)).astype(np.float32),
                      "y": rng.integers(0, classes, n).astype(np.int32)}
            for i, n in enumerate(sizes)}


def logreg60():
    return fs.models.logistic_regression(60, 10)


def run(data, model_=None, **kwargs):
    algorithm = fs.algorithms.fedavg(model_ or logreg60(), optax.sgd(0.1), batch_size=2)
    kwargs = {"rounds": 1, "cohort_size": 2, "chunk_size": 1, "progress": False, **kwargs}
    return fs.simulate(algorithm, data, **kwargs)


def test_from_client_dict_names_the_client_whose_feature_is_another_width():
    clients = wide_clients()
    clients["c1"]["x"] = clients["c1"]["x"][:, :30]
    with pytest.raises(ValueError, match=r"client 'c1': feature 'x' has float32 examples of "
                       r"shape \(30,\), but earlier clients have float32 examples of shape "
                       r"\(60,\)"):
        from_client_dict(clients)


def test_from_client_dict_zero_d_feature():
    clients = wide_clients()
    clients["c1"]["y"] = np.int32(3)
    with pytest.raises(ValueError, match=r"client 'c1': feature 'y' is a scalar.*one row per "
                       "example"):
        from_client_dict(clients)


def test_from_client_dict_mixed_label_dtypes_are_refused_not_merged():
    clients = wide_clients()
    clients["c1"]["y"] = clients["c1"]["y"].astype(np.float32)
    with pytest.raises(ValueError, match=r"client 'c1': feature 'y' has float32 examples.*"
                       r"earlier clients have int32"):
        from_client_dict(clients)


def test_string_features_are_named_before_anything_compiles():
    clients = wide_clients()
    for c in clients.values():
        c["x"] = np.array(["word"] * len(c["y"]))
    data = from_client_dict(clients)
    with pytest.raises(ValueError, match=r"train: feature 'x' has dtype <U4 \(strings.*must be "
                       r"numeric.*data.map"):
        run(data)
    with pytest.raises(ValueError, match=r"data: feature 'x' has dtype <U4"):
        fs.evaluate(logreg60(), logreg60().init(None), data)


@pytest.mark.parametrize("shift, message", [
    (0.5, r"'y' must be integer class ids in \[0, 10\); it holds non-integer values such as "
          r"\d\.5 \(client 'c0'\)"),
    (0.0, r"'y' must be integer class ids in \[0, 10\)\. Its values are whole numbers, so "
          r"casting is safe: data.map\(lambda f: \{\*\*f, 'y': f\['y'\].astype\(np.int32\)\}\)"),
])
def test_float_labels_say_labels_are_class_ids(shift, message):
    clients = wide_clients()
    for c in clients.values():
        c["y"] = c["y"].astype(np.float32) + shift
    data = from_client_dict(clients)
    with pytest.raises(ValueError, match=message):
        run(data)
    with pytest.raises(ValueError, match=message):
        fs.evaluate(logreg60(), logreg60().init(None), data)


def test_one_number_per_example_for_a_60_feature_mlp():
    clients = wide_clients()
    for c in clients.values():
        c["x"] = c["x"][:, 0]
    with pytest.raises(ValueError, match=r"feature 'x' has 1 value\(s\) per example \(shape "
                       r"\(\)\) but the model expects 60 \(shape \(60,\)\)"):
        run(from_client_dict(clients), fs.models.mlp(60, 10))


def test_params_missing_a_leaf():
    with pytest.raises(ValueError, match="params do not fit the model: missing leaf 'b'"):
        run(from_client_dict(wide_clients()), params={"w": jnp.zeros((60, 10))})


@pytest.mark.parametrize("w, b, message", [
    ((30, 10), (10,), r"leaf 'w' has shape \(30, 10\) where the model's init gives \(60, 10\)"),
    ((60, 5), (5,), r"leaf 'w' has shape \(60, 5\) where the model's init gives \(60, 10\)"),
])
def test_params_of_another_shape(w, b, message):
    data = from_client_dict(wide_clients())
    params = {"w": jnp.zeros(w), "b": jnp.zeros(b)}
    with pytest.raises(ValueError, match=message):
        fs.evaluate(logreg60(), params, data)
    with pytest.raises(ValueError, match=message):
        run(data, params=params)
    with pytest.raises(ValueError, match=message):
        fs.evaluate_pooled(logreg60(), params, data)


def test_a_classifier_with_fewer_logits_than_classes_is_named():
    """A label past the logits gives a NaN loss silently: the width is checked when traced."""
    five = fs.models.from_function(lambda key: {"w": jnp.zeros((60, 5))},
                                   lambda p, x: x @ p["w"], num_classes=10)
    with pytest.raises(ValueError, match="gives 5 logits per example but is a classifier of "
                       "10 classes"):
        run(from_client_dict(wide_clients()), five)


def test_evaluate_with_params_none():
    with pytest.raises(ValueError, match=r"params is None: pass the model's params"):
        fs.evaluate(logreg60(), None, from_client_dict(wide_clients()))


def test_a_linen_module_or_a_function_is_refused_where_a_model_goes():
    from flax import linen as nn
    from flax import nnx

    cases = [(nn.Dense(10), r"a flax.linen.Module \(Dense\): wrap it with "
                            r"fs.models.from_linen\(module, input_shape, num_classes\)"),
             (nnx.Linear(60, 10, rngs=nnx.Rngs(0)),
              r"a flax.nnx.Module.*fs.models.from_nnx\(module, num_classes\)"),
             (lambda p, x: x, r"a function \(<lambda>\).*fs.models.from_function")]
    data = from_client_dict(wide_clients())
    for module, message in cases:
        with pytest.raises(TypeError, match="model must be a fs.models.Model, got " + message):
            fs.algorithms.fedavg(module, optax.sgd(0.1))
        with pytest.raises(TypeError, match="model must be a fs.models.Model"):
            fs.evaluate(module, {}, data)


def test_a_number_where_an_optimizer_goes():
    with pytest.raises(TypeError, match=r"client_optimizer must be an optax.GradientTransform"
                       r"ation \(e.g. optax.sgd\(0.01\)\) or a function of the round number "
                       r"that returns one, got float 0.01"):
        fs.algorithms.fedavg(logreg60(), 0.01)
    with pytest.raises(TypeError, match=r"server_optimizer must be an optax.*got float 1.0"):
        fs.algorithms.fedavg(logreg60(), optax.sgd(0.1), 1.0)
    with pytest.raises(TypeError, match=r"got the function optax.sgd itself: call it, e.g. "
                       r"optax.sgd\(0.01\)"):
        fs.algorithms.fedavg(logreg60(), optax.sgd)
    with pytest.raises(TypeError, match=r"client_optimizer\(round\) must return an optax"):
        fs.algorithms.fedavg(logreg60(), lambda r: "sgd")


@pytest.mark.parametrize("argument", ["rounds", "cohort_size"])
def test_fractional_counts_to_simulate(argument):
    with pytest.raises(TypeError, match=rf"{argument} must be an integer, got 2.5 \(float\)"):
        run(from_client_dict(wide_clients()), **{argument: 2.5})


def test_fractional_epochs():
    with pytest.raises(TypeError, match=r"num_epochs must be an integer, got 1.5 \(float\)"):
        fs.algorithms.fedavg(logreg60(), optax.sgd(0.1), num_epochs=1.5)


def test_output_dir_that_is_a_file(tmp_path):
    path = tmp_path / "history"
    path.write_text("")
    with pytest.raises(ValueError, match=r"output_dir '.*history' is a file, not a directory"):
        run(from_client_dict(wide_clients()), output_dir=path)


def test_an_output_dir_with_an_earlier_run_is_refused_not_overwritten(tmp_path):
    data = from_client_dict(wide_clients())
    run(data, output_dir=tmp_path)
    first = (tmp_path / "history.jsonl").read_text()
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run: pass "
                       r"resume=True to continue it, or another output_dir"):
        run(data, output_dir=tmp_path)
    assert (tmp_path / "history.jsonl").read_text() == first


def test_loaders_given_a_directory(tmp_path):
    (tmp_path / "emnist_train.sqlite").write_bytes(b"")
    with pytest.raises(IsADirectoryError, match=r"is a directory; pass the SQLite file itself "
                       r"\(this directory holds \['emnist_train.sqlite'\]\)"):
        fs.data.load_tff_sqlite(tmp_path, "train")
    with pytest.raises(IsADirectoryError, match="is a directory; pass the SQLite file itself"):
        fs.data.load_fedjax_sqlite(tmp_path)


def test_a_dict_where_a_population_goes():
    clients = wide_clients()
    message = (r"must be a fs.data.FederatedData, got dict: for \{client id: \{feature: "
               r"array\}\} use fs.data.from_client_dict")
    with pytest.raises(TypeError, match="train " + message):
        run(clients)
    with pytest.raises(TypeError, match="eval_data " + message):
        run(from_client_dict(clients), eval_data=clients, eval_every=1)
    with pytest.raises(TypeError, match="data " + message):
        fs.evaluate(logreg60(), logreg60().init(None), clients)
    with pytest.raises(TypeError, match=r"did you pass the \(train, test\) pair"):
        run(fs.data.synthetic(num_clients=4))


def test_params_with_nan_are_refused_before_the_first_round():
    params = {"w": jnp.full((60, 10), jnp.nan), "b": jnp.zeros(10)}
    with pytest.raises(ValueError, match=r"params hold non-finite values \(NaN or inf\): 600 "
                       r"of 600 in leaf 'w'"):
        run(from_client_dict(wide_clients()), params=params)


def test_rounds_that_exclude_every_client_report_nan_and_then_stop_the_run(tmp_path):
    """Every client's training overflows (finite features of 1e30): each round keeps the
    server state, reports a NaN training loss (never 0.0), and the third such round stops the
    run with an error naming the likely cause, the rounds so far kept."""
    from fedjax_sim.health import MAX_ROUNDS_ALL_EXCLUDED, DivergedError

    clients = wide_clients()
    for c in clients.values():
        c["x"][:, 0] = 1e30
    params = logreg60().init(None)
    with pytest.warns(UserWarning, match="excluded 2 client"), \
            pytest.raises(DivergedError, match=r"every client's update was non-finite in rounds "
                          r"0-2 \(3 rounds in a row\), so the server params have not changed "
                          r"since the start.*Likely causes: learning rates too large") as info:
        run(from_client_dict(clients), params=params, rounds=10, output_dir=tmp_path)
    history = info.value.result.history
    assert len(history) == MAX_ROUNDS_ALL_EXCLUDED == 3
    assert all(np.isnan(r["train_loss"]) and r["num_included"] == 0 for r in history)
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 3
    np.testing.assert_array_equal(info.value.result.params["w"], params["w"])


def test_the_monitor_lets_a_run_recover_from_rounds_that_exclude_everyone():
    from fedjax_sim.health import Monitor

    def record(r, included):
        n = 3
        return {"round": r, "num_included": included, "num_excluded": n - included,
                "excluded_clients": [], "train_loss": 0.5 if included else float("nan"),
                "update_norm": 1.0, "params_norm": 1.0,
                "clients": {"client_id": ["a", "b", "c"], "update_norm": [1.0] * n,
                            "finite": [bool(included)] * n}}

    monitor = Monitor(num_params=10, params_norm=1.0)
    with pytest.warns(UserWarning, match="excluded 3 client"):
        for r, included in enumerate([3, 0, 0, 3, 0, 0, 3]):
            monitor.check(record(r, included))  # never three in a row: no error
            assert monitor.stuck is None
        monitor.check(record(7, 0))
        monitor.check(record(8, 0))
        assert monitor.stuck is None
        monitor.check(record(9, 0))
    assert "rounds 7-9" in str(monitor.stuck) and "since round 6" in str(monitor.stuck)


def test_client_ids_that_print_alike():
    clients = wide_clients()
    with pytest.raises(ValueError, match=r"client ids 1 and '1' are different keys but both "
                       r"name client '1'"):
        from_client_dict({1: clients["c0"], "1": clients["c1"]})
    with pytest.raises(ValueError, match=r"client_ids mix types \(int, str\), so ids such as 1 "
                       r"and '1' would name one client"):
        from_arrays([1, "1", 1], {"x": np.zeros((3, 2))})
    assert from_arrays([1, 2, 1], {"x": np.zeros((3, 2))}).num_clients == 2


@pytest.mark.parametrize("which", ["client", "server"])
def test_negative_learning_rates(which):
    opts = ((optax.sgd(-0.1), None) if which == "client" else (optax.sgd(0.1), optax.sgd(-1.0)))
    with pytest.raises(ValueError, match=rf"{which}_optimizer moves along the gradient, not "
                       r"against it.*is its learning rate negative\?"):
        fs.algorithms.fedavg(logreg60(), *opts)
    with pytest.raises(ValueError, match="is its learning rate negative"):
        fs.algorithms.fedavg(logreg60(), optax.adam(-0.1) if which == "client" else
                             optax.sgd(0.1), None if which == "client" else
                             fs.algorithms.fedadam(-0.1))


def test_negative_eval_every():
    with pytest.raises(ValueError, match="eval_every must be >= 0, got -1"):
        run(from_client_dict(wide_clients()), eval_every=-1)


def test_more_eval_clients_than_the_evaluation_population():
    data = from_client_dict(wide_clients())
    with pytest.raises(ValueError, match="eval_clients 500 is larger than the evaluation "
                       "population of 3 clients"):
        run(data, eval_data=data, eval_clients=500)
    with pytest.raises(ValueError, match="eval_clients is set but no eval_data"):
        run(data, eval_clients=2)


def test_chunk_size_larger_than_the_cohort():
    data = from_client_dict(wide_clients())
    with pytest.raises(ValueError, match=r"chunk_size 64 is larger than the 2 client\(s\) per "
                       r"device \(cohort 2 over 1 device\(s\)\).*use chunk_size <= 2"):
        run(data, chunk_size=64)
    with pytest.raises(ValueError, match=r"chunk_size 2 is larger than the 1 client\(s\) per "
                       r"device \(cohort 2 over 2 device\(s\)\)"):
        run(data, chunk_size=2, mesh=fs.client_mesh(jax.devices()[:2]))


def test_a_learning_rate_of_1e30_is_warned_about_when_built_and_stops_the_run():
    """Updates of norm ~1e30 overflow float32 squares: every client is excluded (named each
    round), and the third such round stops the run naming the learning rate."""
    from fedjax_sim.health import DivergedError

    with pytest.warns(UserWarning, match=r"client_optimizer takes a step of 1e\+30 for a unit "
                      "gradient: is its learning rate that large on purpose"):
        algorithm = fs.algorithms.fedavg(logreg60(), optax.sgd(1e30), batch_size=2)
    with pytest.warns(UserWarning, match=r"round 0: excluded 3 client\(s\) with non-finite"), \
            pytest.raises(DivergedError, match="learning rates too large"):
        fs.simulate(algorithm, from_client_dict(wide_clients()), rounds=5, cohort_size=3,
                    chunk_size=1, progress=False)


def test_a_huge_finite_update_is_warned_about_as_diverging():
    with pytest.warns(UserWarning, match=r"takes a step of 1e\+12"):
        algorithm = fs.algorithms.fedavg(logreg60(), optax.sgd(1e12), batch_size=2)
    with pytest.warns(UserWarning, match=r"round 0: the server's update has norm [\d.e+]+, "
                      r"[\d.e+]+x the scale of the params it changes.*training is diverging"):
        result = fs.simulate(algorithm, from_client_dict(wide_clients()), rounds=2,
                             cohort_size=3, chunk_size=1, progress=False)
    assert result.history[0]["update_norm"] > 1e10 and result.history[0]["num_included"] == 3


def test_the_server_update_growing_a_thousandfold_in_a_round_is_warned_about():
    from fedjax_sim.health import Monitor

    monitor = Monitor(num_params=4, params_norm=1e9)  # a large model scale: no jump warning
    base = {"num_excluded": 0, "num_included": 3, "excluded_clients": [], "train_loss": 1.0,
            "params_norm": 1e9, "clients": {"client_id": ["a"], "update_norm": [1.0],
                                            "finite": [True]}}
    monitor.check({**base, "round": 0, "update_norm": 1.0})
    with pytest.warns(UserWarning, match=r"round 1: the server's update has norm 5e\+03, "
                      r"5e\+03x the previous round's"):
        monitor.check({**base, "round": 1, "update_norm": 5e3})


def scaled_population(factor):
    train, _ = fs.data.synthetic(1.0, 1.0, num_clients=20, max_examples_per_client=60, seed=2)
    x = train.features["x"].copy()
    lo, hi = train.offsets[3], train.offsets[4]
    x[lo:hi] *= factor
    return fs.data.FederatedData(train.client_ids, {"x": x, "y": train.features["y"]},
                                 train.offsets)


def test_a_client_with_data_scaled_by_1e4_is_flagged_and_warned_about():
    data = scaled_population(1e4)
    bad = str(data.client_ids[3])
    with pytest.warns(UserWarning, match=rf"round 0: client '{bad}' sent an update of norm "
                      r"[\d.e+]+, [\d.e+]+x the cohort's median \(robust z-score [\d.]+\): "
                      r"check its data"):
        result = run(data, rounds=1, cohort_size=20, chunk_size=4)
    record = result.history[0]
    assert record["outlier_clients"] == [bad]
    norms = dict(zip(record["clients"]["client_id"], record["clients"]["update_norm"],
                     strict=True))
    assert norms[bad] > 1000 * np.median(list(norms.values()))


def test_an_outlier_client_is_warned_about_once_a_run_and_flagged_every_round():
    from fedjax_sim.health import Monitor

    monitor = Monitor(num_params=4, params_norm=1.0)
    norms = [1.0, 1.1, 0.9, 1.2, 500.0]
    with pytest.warns(UserWarning, match="client 'e' sent an update") as caught:
        for r in range(3):
            record = {"round": r, "num_excluded": 0, "num_included": 5, "excluded_clients": [],
                      "train_loss": 1.0, "update_norm": 1.0, "params_norm": 1.0,
                      "clients": {"client_id": list("abcde"), "update_norm": norms,
                                  "finite": [True] * 5}}
            monitor.check(record)
            assert record["outlier_clients"] == ["e"]
    assert len(caught) == 1


def test_a_clean_run_flags_no_client():
    result = run(scaled_population(1.0), rounds=5, cohort_size=20, chunk_size=4)
    assert all(r["outlier_clients"] == [] for r in result.history)
    assert all(len(r["clients"]["update_norm"]) == 20 for r in result.history)


def test_outliers_by_robust_z_score_of_log_norms():
    from fedjax_sim.health import outliers

    flagged, z, median = outliers([1.0, 1.2, 0.9, 1.1, 1e3], [True] * 5)
    assert flagged.tolist() == [False] * 4 + [True] and median == pytest.approx(1.1)
    # A spread of 5x is natural (clients of different sizes), even at a high z-score.
    assert not outliers([1.0, 1.0, 1.0, 1.0, 5.0], [True] * 5)[0].any()
    # Excluded clients do not count; a finite update whose norm overflows f32 is an outlier.
    flagged, _, _ = outliers([1.0, 1.1, np.nan, 0.9, np.inf], [True, True, False, True, True])
    assert flagged.tolist() == [False, False, False, False, True]
    assert not outliers([1.0, 1e6], [True, True])[0].any()  # too few to tell


# -- the command line ------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["run", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["run", "--alpha", "-1"], "argument --alpha: must be >= 0, got -1"),
    (["run", "--eval-every", "-2"], "argument --eval-every: must be >= 0, got -2"),
    (["run", "--rounds", "2.5"], "argument --rounds: must be an integer, got '2.5'"),
    (["run", "--cohort-size", "200", "--num-clients", "100"],
     "sampler.cohort_size 200 is larger than the population of 100 clients"),
])
def test_cli_errors_print_the_run_usage_not_a_traceback(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("usage: fedjax-sim run ")
    assert "Traceback" not in err


# -- more mistakes, found by a probe of 231 bad inputs ------------------------------------------
def test_subset_and_client_take_positions_and_say_so():
    data = from_client_dict(wide_clients((4, 6, 3, 5)))
    mask = data.num_examples > 4
    assert data.subset(mask).client_ids.tolist() == ["c1", "c3"]  # a mask, not positions 0/1
    with pytest.raises(TypeError, match=r"subset takes client positions \(integers\); for "
                       r"client ids use data.index_of"):
        data.subset(["c1", "c2"])
    with pytest.raises(IndexError, match="subset: client position 10 is out of range for 4"):
        data.subset([10])
    with pytest.raises(IndexError, match="client position -1 is out of range"):
        data.subset([-1])
    with pytest.raises(TypeError, match=r"got dtype float64"):
        data.subset([0.7, 1.9])
    with pytest.raises(TypeError, match="client takes client positions"):
        data.client("c1")
    assert list(data.get_clients("c1")) == ["c1"]  # one id, not its characters


def test_a_federated_data_built_by_hand_is_checked():
    x, ids = np.zeros((5, 2), np.float32), np.array(["a", "b"])
    FederatedData = fs.data.FederatedData
    cases = [
        ({"x": x}, [1, 3, 5], ValueError, r"offsets must start at 0 and never decrease"),
        ({"x": x}, [0, 3, 2], ValueError, r"offsets must start at 0 and never decrease"),
        ({"x": x}, [0, 3], ValueError, r"offsets must have one entry per client plus one \(3 "
                                       r"for 2 clients\)"),
        ({"x": x}, [0, 3, 4], ValueError, r"feature 'x' has 5 rows but the offsets count 4"),
        ({"x": x.tolist()}, [0, 3, 5], TypeError, r"feature 'x' must be an array"),
        ({"x": x}, [0.0, 3.0, 5.0], TypeError, r"offsets must be integers"),
        ((x,), [0, 3, 5], TypeError, r"features must be a dict"),
        ({"x": x}, [0, 0, 5], ValueError, r"1 client\(s\) have zero examples, e.g. \['a'\]"),
    ]
    for features, offsets, error, message in cases:
        with pytest.raises(error, match=message):
            FederatedData(ids, features, np.asarray(offsets))


def test_feature_builders_name_what_they_were_given():
    x, y = np.zeros((3, 2)), np.zeros(3, np.int32)
    with pytest.raises(TypeError, match=r"from_arrays: features must be a dict \{name: array\}, "
                       "got tuple"):
        from_arrays(["a", "a", "b"], (x, y))
    with pytest.raises(TypeError, match="from_client_dict takes a dict"):
        from_client_dict([{"x": x}])
    with pytest.raises(TypeError, match="client 'a': features must be a dict"):
        from_client_dict({"a": (x, y)})
    with pytest.raises(ValueError, match=r"feature 'x' is ragged.*pad them to one shape"):
        from_arrays(["a", "a", "b"], {"x": [[1.0, 2.0], [3.0], [4.0, 5.0]]})
    data = from_client_dict(wide_clients())
    with pytest.raises(TypeError, match=r"map: fn must return a dict of features, got NoneType "
                       r"\(does it end with a return\?\)"):
        data.map(lambda f: None)
    with pytest.raises(ValueError, match="map: batch_size must be an integer >= 1, got 0"):
        data.map(lambda f: f, batch_size=0)


def test_sequence_labels_and_token_ids_out_of_the_vocabulary():
    rng = np.random.default_rng(0)
    clients = {f"c{i}": {"x": rng.integers(0, 10, (3, 6)).astype(np.int32),
                         "y": rng.integers(0, 10, (3, 6)).astype(np.int32)} for i in range(3)}
    model_ = fs.models.char_lstm(vocab_size=10, hidden=8, num_layers=1)
    clients["c1"]["y"][2, 4] = 40
    with pytest.raises(ValueError, match=r"labels out of range: feature 'y' has 1 value\(s\) "
                       r"outside \[0, 10\) \(e.g. 40 for client 'c1'\)"):
        run(from_client_dict(clients), model_)
    clients["c1"]["y"][2, 4] = 3
    clients["c2"]["x"][0, 0] = 50
    with pytest.raises(ValueError, match=r"token ids out of range: feature 'x'.*e.g. 50 for "
                       r"client 'c2'.*10 token ids in its vocabulary"):
        run(from_client_dict(clients), model_)


def test_nan_features_of_a_resident_population_are_named_before_training():
    """A `map` dividing by a zero standard deviation makes NaNs that no builder sees."""
    data = from_client_dict(wide_clients((6, 8, 5)))
    scaled = data.map(lambda f: {**f, "x": f["x"] / np.where(np.arange(60) == 7, 0.0, 1.0)})
    with pytest.raises(ValueError, match=r"train: feature 'x' has non-finite values \(NaN or "
                       r"inf\), first in example 0 \(client 'c0'\)"):
        run(scaled)
    with pytest.raises(ValueError, match=r"eval_data: feature 'x' has non-finite values"):
        run(data, eval_data=scaled, eval_every=1)


def test_eval_data_is_checked_before_training(tmp_path):
    data = from_client_dict(wide_clients())
    narrow = {c: {"x": f["x"][:, :7], "y": f["y"]} for c, f in wide_clients().items()}
    with pytest.raises(ValueError, match=r"model.metrics failed on one example"):
        run(data, eval_data=from_client_dict(narrow), eval_every=5, rounds=4, output_dir=tmp_path)
    assert not (tmp_path / "history.jsonl").exists()  # nothing trained, nothing lost


def test_no_client_with_a_full_batch_under_drop_remainder():
    data = from_client_dict(wide_clients((6, 8, 5)))
    algorithm = fs.algorithms.fedavg(logreg60(), optax.sgd(0.1), batch_size=50,
                                     drop_remainder=True)
    with pytest.raises(ValueError, match=r"no client has a full batch of 50 examples with "
                       r"drop_remainder=True \(the largest uses 8\)"):
        fs.simulate(algorithm, data, rounds=1, cohort_size=2, chunk_size=1, progress=False)


def test_flags_that_must_be_booleans():
    data = from_client_dict(wide_clients())
    with pytest.raises(TypeError, match=r"shuffle must be True or False, got 'False'"):
        fs.algorithms.fedavg(logreg60(), optax.sgd(0.1), shuffle="False")
    with pytest.raises(TypeError, match=r"drop_remainder must be True or False, got 'no'"):
        fs.algorithms.fedavg(logreg60(), optax.sgd(0.1), drop_remainder="no")
    with pytest.raises(TypeError, match=r"resident must be True or False, got 'no'"):
        run(data, resident="no")
    with pytest.raises(TypeError, match=r"progress must be True or False"):
        run(data, progress="False")


def test_optimizer_mistakes_beyond_a_number():
    with pytest.raises(TypeError, match=r"got the function fs.algorithms.fedadam itself: call "
                       r"it, e.g. fs.algorithms.fedadam\(0.01\)"):
        fs.algorithms.fedavg(logreg60(), fs.algorithms.fedadam)
    with pytest.raises(TypeError, match=r"client_optimizer is a learning-rate schedule \(it "
                       r"returned 0.1 for round 0\), not an optimizer: pass optax.sgd\(schedule\)"):
        fs.algorithms.fedavg(logreg60(), optax.linear_schedule(0.1, 0.0, 100))
    with pytest.raises(TypeError, match=r"needs extra arguments in its update.*optax.lbfgs"):
        fs.algorithms.fedavg(logreg60(), optax.lbfgs())
    with pytest.warns(UserWarning, match=r"server_optimizer does not move for a unit gradient "
                      r"\(update 0\): is its learning rate 0"):
        fs.algorithms.fedavg(logreg60(), optax.sgd(0.1), optax.sgd(0.0))
    with pytest.raises(TypeError, match=r"aggregator must be a fs.aggregators.Aggregator, e.g. "
                       r"fs.aggregators.mean\(\), got function"):
        fs.algorithms.fedavg(logreg60(), optax.sgd(0.1), aggregator=fs.aggregators.mean)
    with pytest.raises(TypeError, match=r"fedsgd takes one full-batch step per client, so it "
                       r"does not take \['batch_size'\]"):
        fs.algorithms.fedsgd(logreg60(), optax.sgd(1.0), batch_size=5)


@pytest.mark.parametrize("build, message", [
    (lambda: fs.algorithms.fedadam(0.01, tau=0.0), r"tau must be > 0"),
    (lambda: fs.algorithms.fedadam(0.01, b1=1.0), r"b1 must be in \[0, 1\)"),
    (lambda: fs.algorithms.fedyogi(0.01, b2=-0.5), r"b2 must be in \[0, 1\)"),
    (lambda: fs.algorithms.fedavgm(1.0, momentum=1.5), r"momentum must be in \[0, 1\)"),
])
def test_server_optimizer_hyperparameters(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_model_constructor_mistakes():
    from flax import linen as nn
    from flax import nnx

    with pytest.raises(TypeError, match=r"num_features must be an integer, got 5.0"):
        fs.models.logistic_regression(5.0, 3)
    with pytest.raises(ValueError, match=r"num_features must be >= 1, got -5"):
        fs.models.logistic_regression(-5, 3)
    with pytest.raises(ValueError, match=r"num_classes must be >= 2, got 1"):
        fs.models.logistic_regression(5, 1)
    with pytest.raises(ValueError, match=r"each entry of hidden must be >= 1, got 0"):
        fs.models.mlp(5, 3, hidden=(0,))
    assert fs.models.mlp(5, 3, hidden=16).inputs.shape == (5,)  # one width is one layer
    with pytest.raises(ValueError, match=r"hidden must be >= 1, got 0"):
        fs.models.char_lstm(hidden=0)
    with pytest.raises(ValueError, match=r"d_model 10 must be a multiple of num_heads 3"):
        fs.models.causal_transformer(d_model=10, num_heads=3)
    with pytest.raises(TypeError, match=r"from_linen takes a module instance, e.g. Dense\(...\), "
                       "not the class Dense"):
        fs.models.from_linen(nn.Dense, (5,), 3)
    with pytest.raises(TypeError, match=r"from_nnx takes an nnx.Module instance.*the class "
                       "Linear"):
        fs.models.from_nnx(nnx.Linear, 3)
    no_train = fs.models.from_linen(nn.Dense(3), 5, 3)  # input_shape 5 is (5,)
    with pytest.raises(TypeError, match=r"Dense.__call__ takes no 'train' argument: pass "
                       r"train_arg=None to from_linen"):
        no_train.init(jax.random.key(0))
    assert fs.models.from_linen(nn.Dense(3), (5,), 3, train_arg=None).init(
        jax.random.key(0))["kernel"].shape == (5, 3)


def test_simulate_argument_mistakes_beyond_counts():
    data = from_client_dict(wide_clients())
    with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh with a 'clients' "
                       r"axis, e.g. fs.client_mesh\(\)"):
        run(data, mesh=jax.devices())
    with pytest.raises(ValueError, match=r"mesh has axes \('data',\) but no 'clients' axis"):
        run(data, mesh=jax.make_mesh((2,), ("data",), devices=jax.devices()[:2]))
    with pytest.raises(ValueError, match=r"seed must be <= 4294967295, got 4294967296"):
        run(data, seed=2**32)  # JAX keys take 32 bits: it would train as seed 0
    params = {"w": jnp.zeros((60, 10), jnp.int32), "b": jnp.zeros(10, jnp.int32)}
    with pytest.raises(ValueError, match=r"leaf 'w' has dtype int32 where the model's init "
                       r"gives float32"):
        run(data, params=params)
    empty = fs.data.FederatedData(np.array([], str), {"x": np.zeros((0, 60), np.float32),
                                                      "y": np.zeros(0, np.int32)}, np.zeros(1, int))
    with pytest.raises(ValueError, match="data has no clients"):
        fs.evaluate(logreg60(), logreg60().init(None), empty)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got -1"):
        fs.evaluate_pooled(logreg60(), logreg60().init(None), data, batch_size=-1)


def test_synthetic_argument_mistakes():
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1e6\]"):
        fs.data.synthetic(alpha=-1)
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1e6\]"):
        fs.data.synthetic(beta=1e39)  # inf features and a dead run, before
    with pytest.raises(TypeError, match=r"num_clients must be an integer, got 10.5"):
        fs.data.synthetic(num_clients=10.5)
    with pytest.raises(ValueError, match=r"num_examples must be one integer or one per client"):
        fs.data.synthetic(num_clients=10, num_examples=[5, 5])


def test_storage_and_text_loader_mistakes(tmp_path):
    data = from_client_dict(wide_clients())
    assert fs.data.storage.save_sqlite(data, tmp_path / "new" / "dir" / "p.sqlite").exists()
    with pytest.raises(ValueError, match=r"feature name\(s\) \['offsets'\] would overwrite"):
        fs.data.storage.save_npy(data.map(lambda f: {**f, "offsets": f["y"]}), tmp_path / "n")
    play = tmp_path / "play.txt"
    play.write_bytes("\ufeffROMEO:\nHello there.\n\nJULIET:\nHi.\n".encode())
    parse_speeches = importlib.import_module("fedjax_sim.data.shakespeare").parse_speeches
    assert list(parse_speeches(play)) == ["ROMEO", "JULIET"]  # no role named "\ufeffROMEO"
    play.write_bytes(b"ROMEO:\n\xff\xfe bad\n")
    with pytest.raises(ValueError, match=r"play.txt: not UTF-8 text"):
        parse_speeches(play)


def test_partition_argument_mistakes():
    from fedjax_sim.data import partition

    features = {"x": np.zeros((100, 3), np.float32), "y": np.arange(100) % 5}
    with pytest.raises(ValueError, match=r"dirichlet: alpha must be a finite number > 0"):
        partition.dirichlet(features, 5, alpha=np.inf)
    with pytest.raises(ValueError, match=r"iid: seed must be a non-negative integer"):
        partition.iid(features, 5, seed=None)
    with pytest.raises(TypeError, match=r"shards_per_client must be an integer, got 2.5"):
        partition.shards(features, 5, shards_per_client=2.5)
    continuous = {"x": features["x"], "y": np.linspace(0, 1, 100)}
    with pytest.raises(ValueError, match=r"label column 'y' holds non-integer values"):
        partition.dirichlet(continuous, 5, alpha=0.5)


def test_cli_output_dir_dot_twice(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--rounds", "1", "--num-clients", "20", "--cohort-size", "5",
            "--chunk-size", "1", "--no-progress", "--output-dir", "."]
    assert cli.main(argv) == 0 and cli.main(argv) == 0
    assert (tmp_path.parent / f"{tmp_path.name}-2" / "history.jsonl").exists()
