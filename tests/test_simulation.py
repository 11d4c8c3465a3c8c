"""The simulation loop: sampling, reproducibility, history, chunk-size choice."""

import importlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import fedjax_sim as fs
from fedjax_sim.chunk_size import autotune, choose_chunk_size, chunk_candidates
from fedjax_sim.rounds import resident_pool
from fedjax_sim.sampling import sample_cohort
from fedjax_sim.simulation import step_efficiency
from fedjax_sim.testing import assert_trees_close, assert_trees_equal


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


@pytest.mark.parametrize("long_round", [True, False])
def test_a_long_round_is_timed_on_part_of_the_cohort(population, monkeypatch, long_round):
    """Where a round is long, each candidate is timed on a quarter of the cohort (at least
    one chunk per device), the rest padding; a short round is timed whole after its first
    run."""
    chunking = importlib.import_module("fedjax_sim.chunk_size")
    rounds = importlib.import_module("fedjax_sim.rounds")
    monkeypatch.setattr(chunking, "LONG_ROUND_S", 0.0 if long_round else float("inf"))
    packed = []
    pack = rounds.RoundRunner.pack
    monkeypatch.setattr(rounds.RoundRunner, "pack", lambda self, indices, r: packed.append(
        (self.engine.chunk_size, len(indices))) or pack(self, indices, r))
    train, _ = population
    algo = _algo()
    state = algo.init(algo.model.init(None), jax.random.key(0))
    k = choose_chunk_size(algo, train, 12, state, sample_cohort(train.num_clients, 12, 0, 0),
                          seed=0, mesh=None, pool=resident_pool(train, None),
                          candidates=[1, 2, 8])
    assert k in (1, 2, 8)
    part = [(c, n) for c, n in packed if n < 12]  # compiles pack the whole cohort
    if long_round:  # a quarter, or one chunk (the sweep may stop before K = 8 under load)
        assert {(1, 3), (2, 3)} <= set(part) <= {(1, 3), (2, 3), (8, 8)}
    else:  # the first timed run finds the round short; all later ones are whole
        assert part == [(1, 3)]


def test_memory_budget_skips_candidates_that_do_not_fit(population):
    train, _ = population
    algo = _algo()
    state = algo.init(algo.model.init(None), jax.random.key(0))
    k = choose_chunk_size(algo, train, 12, state, sample_cohort(train.num_clients, 12, 0, 0),
                          seed=0, mesh=None, pool=resident_pool(train, None), candidates=[1, 12],
                          memory_budget=1)
    assert k == 1  # nothing fits a 1-byte budget: the plain scan is the fallback


def test_residency_and_search_budgets_follow_the_accelerators_memory(monkeypatch):
    rounds = importlib.import_module("fedjax_sim.rounds")
    chunking = importlib.import_module("fedjax_sim.chunk_size")

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    monkeypatch.setattr(rounds.jax, "local_devices", lambda: [Device({"bytes_limit": 80 << 30})])
    assert rounds.device_memory() == 80 << 30
    assert rounds.resident_limit() == 20 << 30  # a quarter: W3's 10,000 clients (6.3 GB) fit
    assert chunking._memory_budget() == int((80 << 30) * 0.6)
    monkeypatch.setattr(rounds.jax, "local_devices", lambda: [Device(None)])  # a CPU
    assert rounds.device_memory() is None and rounds.resident_limit() == rounds.RESIDENT_BYTES


def test_chunk_size_search_places_the_population_once(population, monkeypatch):
    """Every candidate program of the search shares one copy of the resident population (a
    copy per candidate once held ten copies of a 200 MB population at a time)."""
    module = importlib.import_module("fedjax_sim.rounds")
    placed, real = [], module.replicate
    monkeypatch.setattr(module, "replicate",
                        lambda tree, engine: placed.append(tree) or real(tree, engine))
    train, _ = population
    result = fs.simulate(_algo(), train, rounds=2, cohort_size=12, progress=False)
    assert sum(tree is train.features for tree in placed) == 1
    assert result.chunk_size in (1, 2, 4, 8, 12)


def test_autotune_times_contenders_round_robin_so_a_slow_spell_does_not_decide():
    cost = {1: 1.0, 2: 0.8, 4: 0.6, 8: 0.9, 16: 5.0}
    built, calls = [], []

    def seconds(k):
        calls.append(k)
        return cost[k] * (1.8 if len(calls) == 3 else 1.0)  # K=4's sweep run hits a slow spell

    k = autotune([1, 2, 4, 8, 16], lambda k: built.append(k) or True, seconds, repeats=2)
    assert k == 4
    assert built == [1, 2, 4, 8, 16]  # 16 is over 1.5x the best: the sweep ends there
    assert calls == [1, 2, 4, 8, 16] + [1, 2, 4, 8] * 2


def test_autotune_compiles_no_candidate_after_one_past_the_stop_ratio():
    built = []
    k = autotune([1, 2, 4, 8], lambda k: built.append(k) or True,
                 {1: 1.0, 2: 1.6, 4: 0.5, 8: 0.4}.get, repeats=1)
    assert (k, built) == (1, [1, 2])  # 2 ran 1.6x as long as 1: 4 and 8 are not compiled


def test_autotune_stops_before_a_candidate_that_does_not_fit():
    built, calls = [], []
    fits = {1: True, 2: True, 4: False, 8: True}
    k = autotune([1, 2, 4, 8], lambda k: built.append(k) or fits[k],
                 lambda k: calls.append(k) or {1: 2.0, 2: 1.0}[k], repeats=1)
    assert (k, built, calls) == (2, [1, 2, 4], [1, 2, 1, 2])
    assert autotune([4, 8], lambda k: False, lambda k: 1.0) == 4  # the narrowest as fallback


def test_step_efficiency_counts_steps_a_chunk_runs_for_its_longest_client():
    steps = np.array([9, 7, 3, 1, 0, 0])
    assert step_efficiency(steps, 1) == 1.0
    assert step_efficiency(steps, 2) == pytest.approx(20 / (2 * (9 + 3 + 0)))
    assert step_efficiency(steps, 6) == pytest.approx(20 / (6 * 9))
    assert step_efficiency(np.zeros(4, int), 2) == 1.0


def test_chunk_candidates_are_powers_of_two_then_the_whole_device_cohort():
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


# -- Simulation: step, run, checkpoints, resume ---------------------------------------------
def _scaffold_population():
    rng = np.random.default_rng(0)
    clients = {f"c{i}": {"x": rng.normal(size=(n, 5)).astype(np.float32),
                         "y": rng.integers(0, 3, n).astype(np.int32)}
               for i, n in enumerate([5, 9, 4, 12, 7, 6, 10, 3])}
    return fs.data.from_client_dict(clients)


def _strip(history):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in history]


@pytest.mark.parametrize("name", ["fedavg", "scaffold", "ditto"])
def test_a_resumed_run_gives_the_same_bits_as_one_never_stopped(name, tmp_path):
    data = _scaffold_population()
    model = fs.models.logistic_regression(5, 3)
    algo = {"scaffold": lambda: fs.algorithms.scaffold(model, 0.1, batch_size=4),
            "ditto": lambda: fs.algorithms.ditto(model, optax.sgd(0.1), lam=0.5, batch_size=4),
            "fedavg": lambda: fs.algorithms.fedavg(model, optax.sgd(0.1),
                                                   fs.algorithms.fedadam(0.05),
                                                   batch_size=4)}[name]()
    kwargs = dict(cohort_size=3, seed=4, chunk_size=2, eval_data=data, eval_every=2,
                  progress=False)
    whole = fs.simulate(algo, data, rounds=6, **kwargs)
    first = fs.simulate(algo, data, rounds=4, output_dir=tmp_path, **kwargs)
    assert len(first.history) == 4
    resumed = fs.simulate(algo, data, rounds=6, output_dir=tmp_path, resume=True, **kwargs)
    assert resumed.chunk_size_source == "checkpoint"
    for a, b in ((whole.params, resumed.params), (whole.state.opt_state, resumed.state.opt_state),
                 (whole.store, resumed.store), (whole.state.extra, resumed.state.extra)):
        assert_trees_equal(a, b)
    # Round 3's evaluation happened as the first run ended; the rest of the history is equal.
    assert _strip(whole.history)[4:] == _strip(resumed.history)[4:]
    assert [r["train_loss"] for r in whole.history] == [r["train_loss"] for r in resumed.history]
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == list(range(6))


def test_step_and_run_continue_where_they_stopped_and_callbacks_can_stop():
    data = _scaffold_population()
    algo = fs.algorithms.fedavg(fs.models.logistic_regression(5, 3), optax.sgd(0.1),
                                batch_size=4)
    sim = fs.Simulation(algo, data, cohort_size=3, chunk_size=1, progress=False)
    sim.step()
    sim.run(2)
    whole = fs.simulate(algo, data, rounds=3, cohort_size=3, chunk_size=1, progress=False)
    assert sim.round == 3
    assert_trees_equal(sim.result().params, whole.params)
    stop_at_1 = fs.simulate(algo, data, rounds=10, cohort_size=3, chunk_size=1,
                            progress=False, callbacks=[lambda s, record: record["round"] == 1])
    assert [r["round"] for r in stop_at_1.history] == [0, 1]


def test_a_checkpoint_of_another_configuration_is_refused_naming_the_difference(tmp_path):
    data = _scaffold_population()
    algo = fs.algorithms.fedavg(fs.models.logistic_regression(5, 3), optax.sgd(0.1),
                                batch_size=4)
    fs.simulate(algo, data, rounds=2, cohort_size=3, seed=1, chunk_size=1,
                output_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"another configuration \(seed: checkpoint 1, now 2"):
        fs.simulate(algo, data, rounds=3, cohort_size=3, seed=2, chunk_size=1,
                    output_dir=tmp_path, resume=True, progress=False)
    other = fs.algorithms.fedavg(fs.models.logistic_regression(5, 3), optax.sgd(0.1),
                                 batch_size=2)
    with pytest.raises(ValueError, match=r"round_program: checkpoint"):
        fs.simulate(other, data, rounds=3, cohort_size=3, seed=1, chunk_size=1,
                    output_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run: pass "
                       r"resume=True"):
        fs.simulate(algo, data, rounds=3, cohort_size=3, seed=1, chunk_size=1,
                    output_dir=tmp_path, progress=False)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    data = _scaffold_population()
    algo = fs.algorithms.fedavg(fs.models.logistic_regression(5, 3), optax.sgd(0.1),
                                batch_size=4)
    kwargs = dict(cohort_size=3, chunk_size=1, output_dir=tmp_path, checkpoint_every=1,
                  progress=False)
    fs.simulate(algo, data, rounds=3, **kwargs)
    newest = tmp_path / "checkpoints" / "3"
    for f in (newest / "arrays").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 7)  # truncated and garbled
    with pytest.warns(UserWarning, match=r"checkpoints/3 cannot be read.*falling back"):
        sim = fs.Simulation(algo, data, resume=True, **kwargs)
    assert sim.round == 2


def _worker(out_dir, rounds, *extra):
    return subprocess.Popen([sys.executable, str(Path(__file__).with_name("simulation_worker.py")),
                             str(out_dir), str(rounds), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError
        time.sleep(0.002)


@pytest.mark.slow
def test_sigterm_then_kill_9_mid_write_then_resume_gives_the_uninterrupted_bits(tmp_path):
    """Real processes, one run directory: stopped by SIGTERM after its third round (a
    checkpoint, exit 143), resumed and killed with SIGKILL while orbax writes a checkpoint
    (its temporary directory exists), resumed again to the end: the bits of a run never
    stopped."""
    import simulation_worker as worker

    whole = worker.flat(worker.run(tmp_path / "whole", 8))
    run_dir = tmp_path / "stopped"
    proc = _worker(run_dir, 8)
    history = run_dir / "history.jsonl"
    _wait_for(lambda: history.exists() and len(history.read_text().splitlines()) >= 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out.decode()[-2000:]
    assert not (run_dir / "final.npz").exists()
    stopped_at = len(history.read_text().splitlines())

    proc = _worker(run_dir, 8, "--resume")
    ckpt = run_dir / "checkpoints"
    _wait_for(lambda: len(history.read_text().splitlines()) > stopped_at
              and any("tmp" in p.name for p in ckpt.iterdir()))
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    proc = _worker(run_dir, 8, "--resume")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-2000:]
    got = dict(np.load(run_dir / "final.npz"))
    assert got.keys() == whole.keys()
    for k in whole:
        np.testing.assert_array_equal(got[k], whole[k], err_msg=k)


# -- samplers --------------------------------------------------------------------------------
def test_poisson_cohorts_vary_in_size_without_a_recompile():
    data = _scaffold_population()
    algo = fs.algorithms.fedavg(fs.models.logistic_regression(5, 3), optax.sgd(0.1),
                                batch_size=4)
    sampler = fs.sampling.poisson(data.num_clients, 3.0)
    sizes = [len(sampler.sample(0, r)) for r in range(6)]
    assert len(set(sizes)) > 1 and max(sizes) <= sampler.max_size < data.num_clients + 1
    sim = fs.Simulation(algo, data, sampler=sampler, chunk_size=1, progress=False)
    result = sim.run(6)
    assert [r["num_included"] for r in result.history] == sizes
    # One program, compiled ahead for the padded bound: an input of another shape would fail.
    with pytest.raises(ValueError, match=r"poisson: expected_size must be in \(0, 8\]"):
        fs.sampling.poisson(data.num_clients, 9)


def test_samplers_draw_what_they_say():
    n = 50
    uniform = fs.sampling.uniform(n, 10)
    np.testing.assert_array_equal(uniform.sample(1, 2), sample_cohort(n, 10, 1, 2))
    assert len(set(uniform.sample(1, 2).tolist())) == 10
    draws = np.concatenate([fs.sampling.with_replacement(n, 40).sample(0, r) for r in range(5)])
    assert len(np.unique(draws)) < len(draws)  # repeats happen with replacement
    sizes = np.arange(1, n + 1)
    picked = np.concatenate([fs.sampling.by_size(sizes, 5).sample(0, r) for r in range(400)])
    big, small = np.sum(picked >= 40), np.sum(picked < 10)
    assert big > 4 * small  # sampled in proportion to size
    q = np.mean([len(fs.sampling.poisson(n, 5).sample(0, r)) for r in range(400)])
    assert 4.5 < q < 5.5


def test_a_round_vmapped_over_two_seeds_is_the_two_runs():
    """The round's key comes from the state, so vmapping the round over two states (two
    seeds, one cohort) gives exactly the two separate rounds."""
    data = _scaffold_population()
    model = fs.models.from_linen(_Dropout(), (5,), 3)
    algo = fs.algorithms.fedavg(model, optax.sgd(0.1), batch_size=4)
    engine = fs.Engine(1)
    params = model.init(jax.random.key(0))
    inputs, _, _ = fs.testing.round_inputs(algo, data, [0, 3, 5], engine=engine)
    states = [algo.init(params, jax.random.key(s)) for s in (1, 2)]
    one = jax.jit(lambda s: algo.round(s, inputs, (), engine=engine)[0].params)
    both = jax.jit(jax.vmap(lambda s: algo.round(s, inputs, (), engine=engine)[0].params))(
        jax.tree.map(lambda a, b: jnp.stack([a, b]), *states))
    for i, s in enumerate(states):
        assert_trees_close(jax.tree.map(lambda x, i=i: x[i], both), one(s), 1e-6, 1e-7)
    assert not np.allclose(one(states[0])["Dense_0"]["kernel"], one(states[1])["Dense_0"]["kernel"])


def _stack(states):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def test_a_round_vmapped_over_learning_rates_is_the_separate_runs():
    """Client and server learning rates built with optax.inject_hyperparams are traced state:
    two rounds of a vmap over two (client, server) pairs give each pair's own run, which is
    the run with those values as constants."""
    data = _scaffold_population()
    model = fs.models.logistic_regression(5, 3)
    params = model.init(None)
    engine = fs.Engine(2)
    injected = fs.algorithms.fedavg(model, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                                    optax.inject_hyperparams(optax.adam)(learning_rate=0.01),
                                    batch_size=4)
    inputs, _, _ = fs.testing.round_inputs(injected, data, [0, 3, 5, 6], engine=engine)
    pairs = [(0.05, 0.02), (0.3, 0.005)]
    states = [fs.algorithms.with_hparams(injected.init(params, jax.random.key(0)),
                                         client={"learning_rate": c},
                                         server={"learning_rate": s}) for c, s in pairs]
    two_rounds = lambda algo: lambda st: algo.round(
        algo.round(st, inputs, (), engine=engine)[0], inputs, (), engine=engine)[0].params
    both = jax.jit(jax.vmap(two_rounds(injected)))(_stack(states))
    for i, (c, s) in enumerate(pairs):
        plain = fs.algorithms.fedavg(model, optax.sgd(c), optax.adam(s), batch_size=4)
        alone = jax.jit(two_rounds(plain))(plain.init(params, jax.random.key(0)))
        assert_trees_close(jax.tree.map(lambda x, i=i: x[i], both), alone, 1e-5, 1e-6)
    assert not np.allclose(both["w"][0], both["w"][1])
    with pytest.raises(KeyError, match="client optimizer has no traced hyperparameter 'momentum'"):
        fs.algorithms.with_hparams(states[0], client={"momentum": 0.9})
    with pytest.raises(KeyError, match="algorithm has no traced hyperparameter 'mu'"):
        fs.algorithms.with_hparams(states[0], mu=0.1)  # FedAvg has no proximal term


def test_fedprox_vmapped_over_mu_is_the_separate_runs():
    data = _scaffold_population()
    model = fs.models.logistic_regression(5, 3)
    params = model.init(None)
    engine = fs.Engine(2)
    algo = fs.algorithms.fedprox(model, optax.sgd(0.1), mu=1.0, batch_size=2, num_epochs=3)
    inputs, _, _ = fs.testing.round_inputs(algo, data, [0, 3, 5, 6], engine=engine)
    run = lambda a: lambda st: a.round(st, inputs, (), engine=engine)[0].params
    states = [fs.algorithms.with_hparams(algo.init(params, jax.random.key(0)), mu=m)
              for m in (0.01, 3.0)]
    both = jax.jit(jax.vmap(run(algo)))(_stack(states))
    for i, m in enumerate((0.01, 3.0)):
        other = fs.algorithms.fedprox(model, optax.sgd(0.1), mu=m, batch_size=2, num_epochs=3)
        alone = jax.jit(run(other))(other.init(params, jax.random.key(0)))
        assert_trees_close(jax.tree.map(lambda x, i=i: x[i], both), alone, 1e-6, 1e-7)
    assert not np.allclose(both["w"][0], both["w"][1])


def test_scaffold_vmapped_over_client_learning_rates():
    """SCAFFOLD's client learning rate (in both its steps and its control-variate update) is
    traced: a vmap over two rates gives the two algorithms built with them."""
    data = _scaffold_population()
    model = fs.models.logistic_regression(5, 3)
    params = model.init(None)
    engine = fs.Engine(1)
    algo = fs.algorithms.scaffold(model, 0.1, batch_size=4)
    inputs, _, _ = fs.testing.round_inputs(algo, data, [1, 2, 4], engine=engine)
    rows = jax.tree.map(lambda p: jnp.zeros((3, *p.shape)), params)
    run = lambda a: lambda st: a.round(st, inputs, rows, engine=engine)[:2]
    states = [fs.algorithms.with_hparams(algo.init(params, jax.random.key(0)),
                                         client={"learning_rate": lr}) for lr in (0.05, 0.2)]
    both = jax.jit(jax.vmap(run(algo)))(_stack(states))
    for i, lr in enumerate((0.05, 0.2)):
        other = fs.algorithms.scaffold(model, lr, batch_size=4)
        state, new_rows = jax.jit(run(other))(other.init(params, jax.random.key(0)))
        got = jax.tree.map(lambda x, i=i: x[i], both)
        assert_trees_close(got[0].params, state.params, 1e-6, 1e-7)
        assert_trees_close(got[0].extra, state.extra, 1e-6, 1e-7)
        assert_trees_close(got[1], new_rows, 1e-6, 1e-7)


class _Dropout(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(8)(x))))


def test_a_float64_run_under_jax_enable_x64():
    """x64 is process-wide, so a fresh interpreter: params stay float64 through training,
    aggregation and evaluation."""
    code = """
import jax; jax.config.update("jax_enable_x64", True)
import numpy as np, optax, fedjax_sim as fs
train, test = fs.data.synthetic(num_clients=20, seed=0)
train = train.map(lambda f: {**f, "x": f["x"].astype(np.float64)})
model = fs.models.logistic_regression(60, 10)
params = jax.tree.map(lambda p: p.astype(np.float64), model.init(None))
r = fs.simulate(fs.algorithms.fedavg(model, optax.sgd(0.05), batch_size=10), train, rounds=2,
                cohort_size=5, chunk_size=1, params=params, eval_data=test, progress=False)
assert r.params["w"].dtype == np.float64, r.params["w"].dtype
assert np.isfinite(r.history[-1]["train_loss"]) and "eval" in r.history[-1]
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("mesh", [False, True])
def test_scaffold_with_a_host_store_equals_the_device_store(mesh, tmp_path):
    """The host store (in memory, and memory-mapped) gives the device store's bits, params
    and every client's row; a resumed run with a memory-mapped store too."""
    data = _scaffold_population()
    algo = fs.algorithms.scaffold(fs.models.logistic_regression(5, 3), 0.1, batch_size=4)
    kwargs = dict(cohort_size=3, seed=2, chunk_size=1, progress=False,
                  mesh=fs.client_mesh() if mesh else None)
    device = fs.simulate(algo, data, rounds=5, client_store="device", **kwargs)
    host = fs.simulate(algo, data, rounds=5, client_store="host", **kwargs)
    assert isinstance(host.store, fs.client_store.HostStore)
    assert_trees_equal(device.params, host.params)
    n = data.num_clients
    np.testing.assert_array_equal(np.asarray(device.store.written)[:n], host.store.written)
    assert_trees_equal(jax.tree.map(lambda t: np.asarray(t)[:n], device.store.table),
                       host.store.table)
    assert 0 < host.store.written.sum() < n  # some clients sampled, some never
    fs.simulate(algo, data, rounds=3, client_store=tmp_path / "rows", output_dir=tmp_path / "run",
                **kwargs)
    resumed = fs.simulate(algo, data, rounds=5, client_store=tmp_path / "rows",
                          output_dir=tmp_path / "run", resume=True, **kwargs)
    assert isinstance(resumed.store.written, np.memmap)
    assert_trees_equal(device.params, resumed.params)
    assert_trees_equal(host.store.table, resumed.store.table)


def test_the_round_compiles_before_the_first_step_and_reports_its_memory():
    data = _scaffold_population()
    algo = fs.algorithms.fedavg(fs.models.logistic_regression(5, 3), optax.sgd(0.1),
                                batch_size=4)
    sim = fs.Simulation(algo, data, cohort_size=3, chunk_size=1, progress=False)
    assert sim.resident  # a small in-memory population stays on the device
    assert sim.compile() > 0 and sim.compile() == 0.0  # compiled once
    memory = sim.memory_analysis()
    assert memory.temp_size_in_bytes >= 0 and memory.argument_size_in_bytes > 0
    compiled = sim.timings["compile_s"]
    sim.step()
    assert sim.timings["compile_s"] == compiled  # the step compiled nothing more
