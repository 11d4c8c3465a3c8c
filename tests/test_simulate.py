"""The simulation loop: sampling, reproducibility, history, chunk-size choice."""

import importlib
import json

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.simulate import choose_chunk_size, resident_pool, sample_cohort


@pytest.fixture(scope="module")
def population():
    return fs.data.synthetic(1.0, 1.0, num_clients=30, max_examples_per_client=80, seed=1)


def _algo():
    return fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.05),
                                batch_size=10)


def test_sample_cohort_is_seeded_and_without_replacement():
    a = sample_cohort(100, 40, seed=3, round_num=7)
    assert len(set(a.tolist())) == 40 and a.max() < 100
    np.testing.assert_array_equal(a, sample_cohort(100, 40, seed=3, round_num=7))
    assert not np.array_equal(a, sample_cohort(100, 40, seed=3, round_num=8))
    assert not np.array_equal(a, sample_cohort(100, 40, seed=4, round_num=7))


def test_same_seed_same_result_and_history_file(population, tmp_path):
    train, test = population
    kwargs = dict(rounds=4, cohort_size=8, chunk_size=2, eval_data=test, eval_every=2,
                  progress=False)
    a = fs.simulate(_algo(), train, seed=5, output_dir=tmp_path, **kwargs)
    b = fs.simulate(_algo(), train, seed=5, **kwargs)
    c = fs.simulate(_algo(), train, seed=6, **kwargs)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert not np.array_equal(a.params["w"], c.params["w"])

    lines = [json.loads(s) for s in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2, 3]
    assert all(np.isfinite(r["train_loss"]) and r["num_included"] == 8 for r in lines)
    assert [("eval" in r) for r in lines] == [False, True, False, True]
    acc = lines[-1]["eval"]["accuracy"]
    assert 0 <= acc["p10"] <= acc["p50"] <= acc["p90"] <= 1
    record = a.history[-1]
    assert len(record["clients"]["client_id"]) == 8
    assert len(record["eval_clients"]["accuracy"]) == test.num_clients


def test_training_improves_the_model(population):
    train, test = population
    model = fs.models.logistic_regression(60, 10)
    before = fs.evaluate_pooled(model, model.init(None), train)["loss"]
    result = fs.simulate(_algo(), train, rounds=15, cohort_size=10, chunk_size=1,
                         progress=False)
    after = fs.evaluate_pooled(model, result.params, train)["loss"]
    assert after < 0.8 * before


@pytest.mark.parametrize("resident", [True, False])
def test_automatic_chunk_size_is_a_timed_candidate_and_reproducible(population, resident):
    train, _ = population
    algo = _algo()
    state = algo.init(algo.model.init(None), jax.random.key(0))
    pool = resident_pool(train, None) if resident else None
    k = choose_chunk_size(algo, train, 12, state, sample_cohort(train.num_clients, 12, 0, 0),
                          seed=0, mesh=None, pool=pool, candidates=[1, 3, 12])
    assert k in (1, 3, 12)
    auto = fs.simulate(algo, train, rounds=2, cohort_size=12, progress=False)
    fixed = fs.simulate(algo, train, rounds=2, cohort_size=12, chunk_size=auto.chunk_size,
                        progress=False)
    np.testing.assert_array_equal(auto.params["w"], fixed.params["w"])


def test_memory_budget_skips_candidates_that_do_not_fit(population):
    train, _ = population
    algo = _algo()
    state = algo.init(algo.model.init(None), jax.random.key(0))
    k = choose_chunk_size(algo, train, 12, state, sample_cohort(train.num_clients, 12, 0, 0),
                          seed=0, mesh=None, pool=resident_pool(train, None), candidates=[1, 12],
                          memory_budget=1)
    assert k == 1  # nothing fits a 1-byte budget: the plain scan is the fallback


def test_residency_and_search_budgets_follow_the_accelerators_memory(monkeypatch):
    sim = importlib.import_module("fedjax_sim.simulate")

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    monkeypatch.setattr(sim.jax, "local_devices", lambda: [Device({"bytes_limit": 80 << 30})])
    assert sim.device_memory() == 80 << 30
    assert sim.resident_limit() == 20 << 30  # a quarter: W3's 10,000 clients (6.3 GB) fit
    assert sim._memory_budget() == int((80 << 30) * 0.6)
    monkeypatch.setattr(sim.jax, "local_devices", lambda: [Device(None)])  # a CPU
    assert sim.device_memory() is None and sim.resident_limit() == sim.RESIDENT_BYTES


def test_chunk_size_search_places_the_population_once(population, monkeypatch):
    """Every candidate program of the search shares one copy of the resident population (a
    copy per candidate once held ten copies of a 200 MB population at a time)."""
    module = importlib.import_module("fedjax_sim.simulate")  # fs.simulate is the function
    placed, real = [], module.replicate
    monkeypatch.setattr(module, "replicate",
                        lambda tree, engine: placed.append(tree) or real(tree, engine))
    train, _ = population
    result = fs.simulate(_algo(), train, rounds=2, cohort_size=12, progress=False)
    assert sum(tree is train.features for tree in placed) == 1
    assert result.chunk_size in (1, 2, 4, 8, 12)


def test_autotune_times_contenders_round_robin_so_a_slow_spell_does_not_decide():
    from fedjax_sim.simulate import autotune
    cost = {1: 1.0, 2: 0.8, 4: 0.6, 8: 0.9, 16: 5.0}
    built, calls = [], []

    def seconds(k):
        calls.append(k)
        return cost[k] * (1.8 if len(calls) == 3 else 1.0)  # K=4's sweep run hits a slow spell

    k = autotune([1, 2, 4, 8, 16], lambda k: built.append(k) or True, seconds, repeats=2)
    assert k == 4
    assert built == [1, 2, 4, 8, 16]  # 16 is over 2x the best: the sweep ends there
    assert calls == [1, 2, 4, 8, 16] + [1, 2, 4, 8] * 2


def test_autotune_stops_before_a_candidate_that_does_not_fit():
    from fedjax_sim.simulate import autotune
    built, calls = [], []
    fits = {1: True, 2: True, 4: False, 8: True}
    k = autotune([1, 2, 4, 8], lambda k: built.append(k) or fits[k],
                 lambda k: calls.append(k) or {1: 2.0, 2: 1.0}[k], repeats=1)
    assert (k, built, calls) == (2, [1, 2, 4], [1, 2, 1, 2])
    assert autotune([4, 8], lambda k: False, lambda k: 1.0) == 4  # the narrowest as fallback


def test_step_efficiency_counts_steps_a_chunk_runs_for_its_longest_client():
    from fedjax_sim.simulate import step_efficiency
    steps = np.array([9, 7, 3, 1, 0, 0])
    assert step_efficiency(steps, 1) == 1.0
    assert step_efficiency(steps, 2) == pytest.approx(20 / (2 * (9 + 3 + 0)))
    assert step_efficiency(steps, 6) == pytest.approx(20 / (6 * 9))
    assert step_efficiency(np.zeros(4, int), 2) == 1.0


def test_chunk_candidates_are_powers_of_two_then_the_whole_device_cohort():
    from fedjax_sim.simulate import chunk_candidates
    assert chunk_candidates(1) == [1]
    assert chunk_candidates(8) == [1, 2, 4, 8]
    assert chunk_candidates(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_the_default_call_twice_gives_the_same_bits(population, tmp_path, monkeypatch):
    """chunk_size=None searches once; the next run of the same program takes the stored K
    instead of timing again (timings drift: the same call once chose K = 8, then 16)."""
    monkeypatch.setenv("FEDJAX_SIM_CACHE_DIR", str(tmp_path))
    train, test = population
    kwargs = dict(rounds=3, cohort_size=4, eval_data=test, eval_every=3, progress=False)
    a = fs.simulate(_algo(), train, **kwargs)
    b = fs.simulate(_algo(), train, **kwargs)
    assert (a.chunk_size_source, b.chunk_size_source) == ("search", "cache")
    assert a.chunk_size == b.chunk_size
    assert all(r["chunk_size"] == a.chunk_size for r in a.history + b.history)
    for k in a.params:
        assert a.params[k].tobytes() == b.params[k].tobytes()
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert a.history[-1]["eval"] == b.history[-1]["eval"]
    # The seed is an input of the program, so another seed reuses the choice too.
    assert fs.simulate(_algo(), train, seed=3, **kwargs).chunk_size_source == "cache"
    # Another program (here another cohort size) is searched for.
    assert fs.simulate(_algo(), train, **{**kwargs, "cohort_size": 3}).chunk_size_source == \
        "search"
    t = b.timings
    assert set(t) == {"chunk_size_choice_s", "compile_s", "rounds_s", "eval_s", "total_s"}
    assert t["compile_s"] > 0 and t["rounds_s"] > 0 and t["eval_s"] > 0
    assert t["total_s"] >= t["compile_s"] + t["rounds_s"] + t["eval_s"]


def test_the_chunk_size_cache_can_be_turned_off_and_survives_a_corrupt_entry(
        population, tmp_path, monkeypatch):
    train, _ = population
    monkeypatch.setenv("FEDJAX_SIM_CACHE_DIR", "")
    runs = [fs.simulate(_algo(), train, rounds=1, cohort_size=2, progress=False)
            for _ in range(2)]
    assert [r.chunk_size_source for r in runs] == ["search", "search"]
    monkeypatch.setenv("FEDJAX_SIM_CACHE_DIR", str(tmp_path))
    fs.simulate(_algo(), train, rounds=1, cohort_size=2, progress=False)
    (entry,) = (tmp_path / "chunk_size").iterdir()
    assert json.loads(entry.read_text())["chunk_size"] in (1, 2)
    entry.write_text("{not json")
    again = fs.simulate(_algo(), train, rounds=1, cohort_size=2, progress=False)
    assert again.chunk_size_source == "search"
    assert json.loads(entry.read_text())["chunk_size"] == again.chunk_size
