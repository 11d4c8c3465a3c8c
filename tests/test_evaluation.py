"""Per-client evaluation against a plain per-client loop, and the distribution summary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim.data import from_client_dict
from fedjax_sim.evaluation import Evaluator, lower_is_better, summarize

NUM_FEATURES, NUM_CLASSES = 6, 4
RAGGED = (3, 17, 40, 1, 25, 9, 2, 11)


def ragged_data(sizes=RAGGED, seed=0):
    rng = np.random.default_rng(seed)
    return from_client_dict({
        f"c{i}": {"x": rng.normal(size=(n, NUM_FEATURES)).astype(np.float32),
                  "y": rng.integers(0, NUM_CLASSES, n).astype(np.int32)}
        for i, n in enumerate(sizes)})


@pytest.fixture(scope="module")
def setup():
    model = fs.models.mlp(NUM_FEATURES, NUM_CLASSES, hidden=(8,))
    params = jax.jit(model.init)(jax.random.key(1))
    data = ragged_data()
    return model, params, data


def reference(model, params, data):
    """Per-client mean of each metric, one client at a time, on the whole client at once."""
    metrics = jax.jit(model.metrics)  # one small program per client size: fast to compile
    out = {}
    for i in range(data.num_clients):
        out[data.client_ids[i]] = {k: float(np.mean(np.asarray(v, np.float64)))
                                   for k, v in metrics(params, data.client(i)).items()}
    return out


# -- summarize -------------------------------------------------------------------------------
def test_summarize_by_hand():
    values = np.array([0.9, 0.2, 0.5, 0.7, 0.1, 0.8, 0.3, 0.6, 0.4, 1.0,
                       0.55, 0.65, 0.15, 0.35, 0.45, 0.25, 0.75, 0.85, 0.95, 0.05])
    weights = np.arange(1, 21, dtype=np.float64)
    s = summarize(values, weights, lower_better=False)
    assert s["weighted_mean"] == pytest.approx(np.dot(values, weights) / weights.sum())
    assert s["mean"] == pytest.approx(values.sum() / 20)
    ranked = np.sort(values)
    for q in (10, 50, 90):
        # Linear interpolation between order statistics (numpy's default).
        pos = q / 100 * (len(values) - 1)
        lo = int(np.floor(pos))
        expected = ranked[lo] + (pos - lo) * (ranked[lo + 1] - ranked[lo])
        assert s[f"p{q}"] == pytest.approx(expected)
        assert s[f"p{q}"] == pytest.approx(np.percentile(values, q))
    # Worst decile of an accuracy: the two lowest values.
    assert s["worst10"] == pytest.approx((0.05 + 0.1) / 2)

    loss = summarize(values, weights, lower_better=True)
    # Worst decile of a loss: the two highest values.
    assert loss["worst10"] == pytest.approx((1.0 + 0.95) / 2)
    assert loss["mean"] == s["mean"] and loss["p50"] == s["p50"]


def test_summarize_few_clients_worst_is_single_worst():
    values = np.array([0.3, 0.9, 0.6])
    assert summarize(values, np.ones(3), False)["worst10"] == pytest.approx(0.3)
    assert summarize(values, np.ones(3), True)["worst10"] == pytest.approx(0.9)
    s = summarize(values, np.array([1.0, 0.0, 3.0]), False)
    assert s["weighted_mean"] == pytest.approx((0.3 + 1.8) / 4)


def test_lower_is_better():
    assert lower_is_better("loss") and lower_is_better("train_loss")
    assert not lower_is_better("accuracy")


# -- per-client evaluation -------------------------------------------------------------------
def check_against_reference(ev, ref, data, indices=None):
    indices = np.arange(data.num_clients) if indices is None else np.asarray(indices)
    ids = ev.clients["client_id"].tolist()
    assert ids == data.client_ids[indices].tolist()  # population order
    np.testing.assert_array_equal(ev.clients["num_examples"], data.num_examples[indices])
    for k in ("loss", "accuracy"):
        got = np.asarray(ev.clients[k])
        want = np.array([ref[c][k] for c in ids])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=k)
        counts = data.num_examples[indices].astype(np.float64)
        assert ev.summary[k] == pytest.approx(
            summarize(want, counts, lower_is_better(k), data.num_clients), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, len(RAGGED)])
def test_evaluator_matches_per_client_loop(setup, chunk_size):
    model, params, data = setup
    ref = reference(model, params, data)
    ev = Evaluator(model, data, batch_size=4, chunk_size=chunk_size)(params)
    assert set(ev.summary) == {"loss", "accuracy"}
    assert set(ev.summary["loss"]) == {"weighted_mean", "mean", "mean_ci95", "std", "p10",
                                       "p50", "p90", "worst10"}
    assert ev.summary["loss"]["mean_ci95"] == 0.0  # every client: the population's mean
    check_against_reference(ev, ref, data)
    acc = ev.clients["accuracy"]
    # Accuracy is a fraction of each client's examples.
    np.testing.assert_allclose(acc * data.num_examples, np.round(acc * data.num_examples),
                               atol=1e-4)


def test_evaluate_default_and_reuse(setup):
    model, params, data = setup
    ev = fs.evaluate(model, params, data, batch_size=5)
    check_against_reference(ev, reference(model, params, data), data)
    # The same Evaluator with new params gives the new params' metrics.
    evaluator = Evaluator(model, data, batch_size=7, chunk_size=2)
    other = jax.tree.map(lambda p: p * 0.5, params)
    check_against_reference(evaluator(params), reference(model, params, data), data)
    check_against_reference(evaluator(other), reference(model, other, data), data)


def test_evaluate_pooled_is_example_weighted_mean(setup):
    model, params, data = setup
    ev = fs.evaluate(model, params, data)
    pooled = fs.evaluate_pooled(model, params, data, batch_size=7)  # last batch is partial
    assert set(pooled) == {"loss", "accuracy"}
    for k in pooled:
        want = np.sum(ev.clients[k] * ev.clients["num_examples"]) / data.total_examples
        assert pooled[k] == pytest.approx(want, rel=1e-5)
        assert pooled[k] == pytest.approx(ev.summary[k]["weighted_mean"], rel=1e-5)
    # And against all examples at once.
    allx = {k: jax.numpy.asarray(v) for k, v in data.features.items()}
    direct = {k: float(np.mean(v)) for k, v in model.metrics(params, allx).items()}
    pooled = fs.evaluate_pooled(model, params, data)  # one batch of all examples
    for k in direct:
        assert pooled[k] == pytest.approx(direct[k], rel=1e-5)


def test_num_clients_sampling(setup):
    model, params, data = setup
    ref = reference(model, params, data)
    a = Evaluator(model, data, batch_size=4, num_clients=3, seed=1)
    b = Evaluator(model, data, batch_size=4, num_clients=3, seed=1)
    assert len(a.positions) == 3 and len(set(a.positions.tolist())) == 3
    np.testing.assert_array_equal(a.positions, b.positions)
    ev = a(params)
    assert len(ev.clients["client_id"]) == 3
    assert len(set(ev.clients["client_id"].tolist())) == 3
    check_against_reference(ev, ref, data, np.sort(a.positions))
    # Another seed samples another set (for some seed).
    others = {tuple(Evaluator(model, data, num_clients=3, seed=s).positions.tolist())
              for s in range(2, 6)}
    assert others - {tuple(a.positions.tolist())}
    # All the population, or more than it: refused, since it cannot be a sample.
    ev_all = fs.evaluate(model, params, data, num_clients=data.num_clients)
    assert ev_all.clients["client_id"].tolist() == data.client_ids.tolist()
    with pytest.raises(ValueError, match=r"num_clients 100 is larger than the evaluation "
                       rf"population of {data.num_clients} clients"):
        fs.evaluate(model, params, data, num_clients=100)
    with pytest.raises(ValueError, match="num_clients must be >= 1"):
        Evaluator(model, data, num_clients=0)



def test_ratio_metrics_are_summed_then_divided():
    """A metric given as (numerator, denominator) per example, like next-token accuracy over
    each sequence's valid tokens, is pooled by tokens, not averaged per example."""
    rng = np.random.default_rng(0)
    sizes = [3, 5, 1, 4]
    ids = np.repeat(np.arange(len(sizes)), sizes)
    valid = rng.integers(0, 4, len(ids)).astype(np.float32)   # valid tokens per example
    valid[ids == 2] = 0.0                                        # client 2 has none at all
    correct = np.floor(valid * rng.uniform(size=len(ids))).astype(np.float32)
    data = fs.data.from_arrays(ids.astype(str), {"correct": correct, "valid": valid})

    def metrics(params, batch):
        return {"loss": batch["valid"] * 0.0 + params,
                "accuracy": (batch["correct"], batch["valid"])}

    model = fs.models.Model(init=lambda key: jnp.float32(0.0), loss=None, metrics=metrics)
    ev = fs.evaluate(model, jnp.float32(0.5), data, batch_size=2)
    for i in range(len(sizes)):
        m = ids == i
        expected = correct[m].sum() / valid[m].sum() if valid[m].sum() else np.nan
        np.testing.assert_allclose(ev.clients["accuracy"][i], expected, rtol=1e-6)
    has = np.array([valid[ids == i].sum() > 0 for i in range(len(sizes))])
    assert np.isnan(ev.clients["accuracy"][2]) and has.sum() == 3
    pooled = correct.sum() / valid.sum()
    np.testing.assert_allclose(ev.summary["accuracy"]["weighted_mean"], pooled, rtol=1e-6)
    np.testing.assert_allclose(fs.evaluate_pooled(model, jnp.float32(0.5), data)["accuracy"],
                               pooled, rtol=1e-6)
    np.testing.assert_allclose(ev.summary["accuracy"]["mean"],
                               np.mean(ev.clients["accuracy"][has]), rtol=1e-6)


def test_format_summary_lists_the_distribution_in_a_fixed_order():
    from fedjax_sim.evaluation import format_summary
    line = format_summary({"p90": 0.9, "weighted_mean": 0.5, "mean": 0.25, "p10": 0.1,
                           "p50": 0.5, "worst10": 0.0})
    assert line == "weighted_mean 0.500  mean 0.250  p10 0.100  p50 0.500  p90 0.900  worst10 0.000"


def test_the_confidence_interval_covers_the_population_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    population = rng.beta(2, 5, 2000)  # a skewed per-client accuracy
    covered = []
    for _ in range(400):
        sample = population[rng.choice(len(population), 150, replace=False)]
        half = fs.evaluation.mean_ci95(sample, len(population))
        covered.append(abs(sample.mean() - population.mean()) <= half)
    assert 0.92 <= np.mean(covered) <= 0.98
    # The finite-population correction: the whole population has no uncertainty, and a
    # sample of nearly all of it little.
    assert fs.evaluation.mean_ci95(population, len(population)) == 0.0
    assert fs.evaluation.mean_ci95(population[:1990], 2000) < 0.1 * fs.evaluation.mean_ci95(
        population[:1990], 10**9)


def test_a_rolling_sample_evaluates_other_clients_each_round_with_one_program(setup):
    model, params, data = setup
    ev = Evaluator(model, data, num_clients=3, rolling=True, seed=1)
    ev(params, round_num=0)
    compiled = _run_cache_size()
    firsts = {tuple(ev(params, round_num=r).clients["client_id"]) for r in range(6)}
    assert len(firsts) > 1  # other clients
    assert _run_cache_size() == compiled  # any 3 clients fit the one program
    again = ev(params, round_num=2).clients["client_id"]
    assert tuple(again) == tuple(data.client_ids[ev.sample(2)])  # seeded by (seed, round)
    assert ev(params, round_num=4).summary["accuracy"]["mean_ci95"] > 0
    fixed = Evaluator(model, data, num_clients=3, seed=1)
    assert len({tuple(fixed(params, round_num=r).clients["client_id"]) for r in range(3)}) == 1


def _run_cache_size():
    from fedjax_sim import evaluation
    return evaluation._run._cache_size()


def test_fairness_figures_on_a_case_by_hand():
    acc = np.array([0.2, 0.4, 0.6, 0.8, 1.0, 0.0])
    sizes = np.array([1, 2, 3, 4, 5, 6])
    out = fs.evaluation.fairness(acc, sizes, baseline=np.array([0.2, 0.5, 0.1, 0.8, 0.9, 0.1]),
                                 bins=2)
    assert out["std"] == pytest.approx(np.std(acc))
    assert out["p90_minus_p10"] == pytest.approx(np.percentile(acc, 90) - np.percentile(acc, 10))
    assert [b["clients"] for b in out["by_size"]] == [3, 3]
    assert out["by_size"][0]["mean"] == pytest.approx(0.4)  # sizes 1-3
    assert out["by_size"][1]["max_examples"] == 6
    assert out["helped"] == pytest.approx(2 / 6) and out["hurt"] == pytest.approx(2 / 6)
