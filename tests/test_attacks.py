"""Attacks: the malicious set and its sampler, data poisoning and its success sets, update
attacks against their formulas (malicious clients only), "a little is enough" against the
benign statistics, and bad input."""

import json
import runpy
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import norm

import fedjax_sim as fs
import fedjax_sim.testing as fst
from fedjax_sim import attacks as at
from fedjax_sim.aggregators import Reduced
from fedjax_sim.engine import ClientContext

A = fs.aggregators
N = 24


@pytest.fixture(scope="module")
def data():
    return fs.data.synthetic(1.0, 1.0, num_clients=N, seed=0)


@pytest.fixture(scope="module")
def adversary():
    return at.Adversary.choose(N, 0.25, seed=3)


def test_choose_is_seeded_and_sized(adversary):
    assert len(adversary.malicious) == 6
    assert np.array_equal(adversary.malicious, at.Adversary.choose(N, 0.25, seed=3).malicious)
    assert not np.array_equal(adversary.malicious, at.Adversary.choose(N, 0.25, seed=4).malicious)
    assert adversary.mask.sum() == 6 and adversary.mask[adversary.malicious].all()


def test_sampler_puts_exactly_m_malicious_in_every_cohort(adversary):
    sampler = adversary.sampler(8, 3)
    cohorts = [sampler.sample(0, r) for r in range(20)]
    for c in cohorts:
        assert len(c) == 8 and len(set(c.tolist())) == 8
        assert adversary.mask[c].sum() == 3
    assert np.array_equal(cohorts[5], sampler.sample(0, 5))  # seeded by (seed, round)
    assert not np.array_equal(cohorts[5], sampler.sample(1, 5))
    # The malicious are spread through the cohort, not all first.
    assert any(not adversary.mask[c[:3]].all() for c in cohorts)


def test_label_flip_rewrites_the_malicious_clients_only(data, adversary):
    train, test = data
    flip = at.label_flip(10)
    poisoned = at.poison(train, adversary, flip)
    for i in range(N):
        before, after = train.client(i)["y"], poisoned.client(i)["y"]
        want = 9 - before if adversary.mask[i] else before
        np.testing.assert_array_equal(after, want)
        np.testing.assert_array_equal(poisoned.client(i)["x"], train.client(i)["x"])
    source = at.label_flip(10, source=2, target=7)
    ys = at.poison(train, adversary, source).features["y"]
    changed = ys != train.features["y"]
    assert np.all(train.features["y"][changed] == 2) and np.all(ys[changed] == 7)
    success = source.success_data(test)
    assert success.total_examples == int(np.sum(test.features["y"] == 2))
    assert np.all(success.features["y"] == 7)


def test_backdoor_stamps_a_fraction_of_the_malicious_examples():
    rng = np.random.default_rng(0)
    x = rng.random((60, 28, 28)).astype(np.float32) * 0.5
    y = rng.integers(0, 5, 60).astype(np.int32)
    data = fs.data.from_arrays(np.repeat(np.arange(6), 10), {"x": x, "y": y})
    adv = at.Adversary(np.array([1, 4]), 6)
    door = at.backdoor(3, 5, size=3, fraction=0.5)
    poisoned = at.poison(data, adv, door, seed=0)
    px, py = poisoned.features["x"], poisoned.features["y"]
    stamped = np.all(px[:, -3:, -3:] == 1.0, axis=(1, 2))
    rows = np.concatenate([np.arange(data.offsets[i], data.offsets[i + 1]) for i in (1, 4)])
    assert not stamped[np.setdiff1d(np.arange(60), rows)].any()  # benign untouched
    np.testing.assert_array_equal(px[~stamped], data.features["x"][~stamped])
    assert 4 <= stamped[rows].sum() <= 16  # about half of 20
    assert np.all(py[stamped] == 3) and np.array_equal(py[~stamped], y[~stamped])
    # Only the pattern changes: the rest of a stamped image is as it was.
    np.testing.assert_array_equal(px[stamped][:, :-3], data.features["x"][stamped][:, :-3])
    # Flat images take the same pattern.
    flat = fs.data.from_arrays(np.repeat(np.arange(6), 10), {"x": x.reshape(60, -1), "y": y})
    np.testing.assert_array_equal(at.poison(flat, adv, door, seed=0).features["x"],
                                  px.reshape(60, -1))
    success = door.success_data(data)
    assert success.total_examples == int(np.sum(y != 3))
    assert np.all(success.features["y"] == 3)
    assert np.all(success.features["x"][:, -3:, -3:] == 1.0)


def _contexts(ids):
    return [ClientContext(jnp.int32(i), jax.random.key(i), jnp.int32(5), jnp.int32(1))
            for i in ids]


def test_update_attacks_follow_their_formulas_on_malicious_clients_only(adversary):
    ids = list(range(N))
    outputs = [{"w": jnp.full((3,), float(i + 1))} for i in ids]
    bad = adversary.mask
    for stage, want in [(at.sign_flip(adversary, 2.0), lambda o: -2.0 * o),
                        (at.scaling(adversary, 10.0), lambda o: 10.0 * o)]:
        for ctx, out in zip(_contexts(ids), outputs, strict=True):
            got, w, m = stage.client(out, jnp.float32(1), ctx, ())
            expect = want(out["w"]) if bad[int(ctx.id)] else out["w"]
            np.testing.assert_allclose(got["w"], expect)
            assert bool(m["malicious"]) == bad[int(ctx.id)] and float(w) == 1
    noise = at.gaussian(adversary, 0.5)
    draws = []
    for ctx, out in zip(_contexts(ids), outputs, strict=True):
        got = noise.client(out, jnp.float32(1), ctx, ())[0]["w"]
        if bad[int(ctx.id)]:
            draws.append(np.asarray(got))
        else:
            np.testing.assert_array_equal(got, out["w"])
    draws = np.concatenate(draws)
    assert abs(draws.mean()) < 0.5 and 0.2 < draws.std() < 0.9  # N(0, 0.25), 18 draws
    # A padding client (id >= N) is never malicious.
    pad = ClientContext(jnp.int32(N + 3), jax.random.key(0), jnp.int32(0), jnp.int32(0))
    np.testing.assert_array_equal(at.sign_flip(adversary).client(outputs[0], jnp.float32(0),
                                                                 pad, ())[0]["w"],
                                  outputs[0]["w"])


def _client_norms(train, chain, sampler, mesh):
    model = fs.models.logistic_regression(60, 10)
    algo = fs.algorithms.fedavg(model, optax.sgd(0.05), aggregator=chain, batch_size=10)
    result = fs.simulate(algo, train, rounds=1, sampler=sampler, seed=0, chunk_size=2,
                         mesh=mesh, progress=False)
    c = result.history[0]["clients"]
    ids = train.index_of(c["client_id"]).tolist()
    delta = jax.tree.map(jnp.subtract, result.params, model.init(jax.random.key(0)))
    return dict(zip(ids, c["update_norm"], strict=True)), c, delta


@pytest.mark.parametrize("mesh", [None, "all"])
def test_update_attacks_in_a_simulation_on_1_and_8_devices(data, mesh):
    """Sign flip, scaling and Gaussian noise on three disjoint malicious pairs in one cohort:
    the server's per-client norms are scale times, factor times the honest run's, and
    stddev sqrt(d) for the noise; every benign client's is the same as in the honest run."""
    train, _ = data
    mesh = None if mesh is None else fs.client_mesh()
    flip, boost, noise = (at.Adversary(np.array(ids), N) for ids in ([1, 7], [4, 9], [2, 11]))
    everyone = at.Adversary(np.array([1, 7, 4, 9, 2, 11]), N)
    sampler = everyone.sampler(10, 6)  # all six malicious and four benign each round
    tail = (A.mask_nonfinite(), A.weight_by("uniform"), A.mean())
    honest, _, _ = _client_norms(train, A.chain(*tail), sampler, mesh)
    attacked, _, _ = _client_norms(
        train, A.chain(at.sign_flip(flip, 3.0), at.scaling(boost, 5.0),
                       at.gaussian(noise, 0.1), *tail), sampler, mesh)
    assert set(honest) == set(attacked) and len(honest) == 10
    d = 60 * 10 + 10
    for cid, was in honest.items():
        if flip.mask[cid]:
            np.testing.assert_allclose(attacked[cid], 3.0 * was, rtol=1e-5)
        elif boost.mask[cid]:
            np.testing.assert_allclose(attacked[cid], 5.0 * was, rtol=1e-5)
        elif noise.mask[cid]:  # chi with d degrees of freedom: within a few percent
            np.testing.assert_allclose(attacked[cid], 0.1 * np.sqrt(d), rtol=0.1)
        else:
            np.testing.assert_allclose(attacked[cid], was, rtol=1e-6)


def test_sign_flip_of_every_client_flips_the_mean_and_composes_with_clipping(data):
    """With the whole cohort malicious the mean is -scale times the honest mean (the sign
    the norms cannot show); a clip after the attack, before the median (a robust rule after
    DP clipping), bounds exactly the boosted clients."""
    train, _ = data
    everyone = at.Adversary(np.arange(N), N)
    tail = (A.mask_nonfinite(), A.weight_by("uniform"), A.mean())
    _, _, honest = _client_norms(train, A.chain(*tail), everyone.sampler(8), None)
    _, c, flipped = _client_norms(train, A.chain(at.sign_flip(everyone, 2.0), *tail),
                                  everyone.sampler(8), None)
    assert all(c["malicious"])
    fst.assert_trees_close(flipped, jax.tree.map(lambda h: -2.0 * h, honest))
    adv = at.Adversary(np.array([3, 5, 8]), N)
    # The health monitor names the boosted clients, as it sees what they sent.
    with pytest.warns(UserWarning, match="outlier_clients") as caught:
        norms, c, delta = _client_norms(
            train, A.chain(at.scaling(adv, 1000.0), A.mask_nonfinite(), A.clip(20.0),
                           A.weight_by("uniform"), A.median()), adv.sampler(8, 3), None)
    assert len(caught) == 3
    bad = adv.mask[train.index_of(c["client_id"])]
    assert bad.sum() == 3 and np.array_equal(np.asarray(c["malicious"]), bad)
    np.testing.assert_array_equal(np.asarray(c["clipped"]), bad)
    assert min(v for k, v in norms.items() if adv.mask[k]) > 20.0  # sent boosted, then clipped
    assert float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(delta)))) < 20.0


def test_success_on_a_hand_made_model():
    """A linear model on 4x4 images that answers class 2 when the trigger is on, unless
    pixel 0 (weight 10 toward class 1) outvotes it: success is the share of non-target test
    images whose pixel 0 is off."""
    rng = np.random.default_rng(1)
    x = rng.random((40, 16)).astype(np.float32) * 0.01
    x[::3, 0] = 1.0
    y = rng.integers(0, 3, 40).astype(np.int32)
    test = fs.data.from_arrays(np.repeat(np.arange(4), 10), {"x": x, "y": y})
    model = fs.models.logistic_regression(16, 3)
    w = np.zeros((16, 3), np.float32)
    w[[10, 11, 14, 15], 2] = 1.0  # the 2x2 bottom-right corner
    w[0, 1] = 10.0
    params = {"w": jnp.asarray(w), "b": jnp.array([0.5, 0.0, 0.0])}
    door = at.backdoor(2, 3, image_shape=(4, 4), size=2)
    other = y != 2
    want = np.sum(other & (x[:, 0] < 0.5)) / np.sum(other)
    assert 0.2 < want < 0.9
    np.testing.assert_allclose(at.success(model, params, door, test), want, rtol=1e-6)
    # Label flipping 0 -> 1: the class-0 images with pixel 0 on are put in class 1.
    flip = at.label_flip(3, source=0, target=1)
    zero = y == 0
    np.testing.assert_allclose(at.success(model, params, flip, test),
                               np.sum(zero & (x[:, 0] > 0.5)) / np.sum(zero), rtol=1e-6)


def test_alie_crafts_mu_minus_z_sigma_of_the_benign_rows():
    adv = at.Adversary(np.array([0, 1]), 10)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(7, 5)).astype(np.float32)
    ids = np.array([0, 1, 2, 3, 4, 5, 12])  # two malicious, four benign, one padding
    weights = np.array([1, 1, 1, 1, 1, 1, 0], np.float32)
    bad = np.isin(ids, [0, 1])
    benign = rows[(weights > 0) & ~bad]
    n, m = 6, 2
    z = norm.ppf((n - (np.floor(n / 2 + 1) - m)) / n)
    crafted = benign.mean(0) - z * benign.std(0)
    for inner, reduce in [(A.median(), lambda r: np.median(r, 0)),
                          (A.mean(), lambda r: r.mean(0))]:
        stage = at.alie(adv, inner)
        outs = [stage.client({"w": jnp.asarray(r)}, jnp.float32(w), ctx, ())
                for r, w, ctx in zip(rows, weights, _contexts(ids), strict=True)]
        out = jax.tree.map(lambda *xs: jnp.stack(xs), *[o[0] for o in outs])
        got, _, metrics = stage.server(Reduced(out, jnp.asarray(weights)), (),
                                       jax.random.key(0))
        want = reduce(np.concatenate([np.stack([crafted, crafted]), benign]))
        np.testing.assert_allclose(got["w"], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["alie_z"], z, rtol=1e-5)
    fixed = at.alie(adv, A.median(), z=1.5)
    assert fixed.reduction == "rows"


def test_alie_in_a_simulation_moves_the_mean_not_the_median(data):
    """Through a round: 3 of 10 clients sending mu - 100 sigma drag the mean 100 times
    further than honest clients would and leave the median among the benign values."""
    train, _ = data
    adv = at.Adversary(np.arange(6), N)
    model = fs.models.logistic_regression(60, 10)
    norms = {}
    for name, rule in (("mean", A.mean()), ("median", A.median())):
        for z in (0.0, 100.0):
            algo = fs.algorithms.fedavg(
                model, optax.sgd(0.05), batch_size=10,
                aggregator=A.chain(A.weight_by("uniform"), at.alie(adv, rule, z=z)))
            rec = fs.simulate(algo, train, rounds=1, sampler=adv.sampler(10, 3), seed=0,
                              chunk_size=2, progress=False)
            assert rec.history[0]["server"]["alie_z"] == z
            assert sum(rec.history[0]["clients"]["malicious"]) == 3
            norms[name, z] = float(np.linalg.norm(rec.params["w"]))
    assert norms["mean", 100.0] > 30 * norms["mean", 0.0]
    assert norms["median", 100.0] < 2 * norms["median", 0.0]


@pytest.mark.parametrize("rule", [fs.robust.trimmed_mean(0.2), fs.robust.krum(1),
                                  fs.robust.multi_krum(1, 4), fs.robust.geometric_median(),
                                  fs.robust.centered_clipping(0.5)], ids=lambda r: r.name)
def test_alie_hands_the_crafted_rows_to_any_robust_rule(rule):
    """One code path: ALIE in front of a rule gives what the rule gives on the benign rows
    with the malicious ones replaced by the crafted update (z given), and keeps its cohort
    check."""
    adv = at.Adversary(np.array([0, 3]), 10)
    rows = np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)
    ids, weights = np.arange(8), np.ones(8, np.float32)
    benign = rows[~np.isin(ids, [0, 3])]
    crafted = rows.copy()
    crafted[[0, 3]] = benign.mean(0) - 1.5 * benign.std(0)
    stage = at.alie(adv, rule, z=1.5)
    outs = [stage.client({"w": jnp.asarray(r)}, jnp.float32(1), ctx, ())
            for r, ctx in zip(rows, _contexts(ids), strict=True)]
    out = jax.tree.map(lambda *xs: jnp.stack(xs), *[o[0] for o in outs])
    state = stage.init({"w": jnp.zeros(4)})
    got, _, _ = stage.server(Reduced(out, jnp.asarray(weights)), state, jax.random.key(0))
    want, _, _ = rule.server(Reduced({"w": jnp.asarray(crafted)}, jnp.asarray(weights)),
                             rule.init({"w": jnp.zeros(4)}), jax.random.key(0))
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5, atol=1e-6)
    if rule.check is not None:
        with pytest.raises(ValueError, match="krum"):
            at.alie(adv, rule, z=1.5).check(3)


def test_eval_extra_records_the_attack_success(data, adversary):
    train, test = data
    model = fs.models.logistic_regression(60, 10)
    flip = at.label_flip(10)
    algo = fs.algorithms.fedavg(model, optax.sgd(0.05), batch_size=10)
    success = flip.success_data(test)
    result = fs.simulate(algo, at.poison(train, adversary, flip), rounds=2, cohort_size=6,
                         seed=0, eval_data=test, eval_extra={"attack_success": success},
                         chunk_size=2, progress=False)
    rec = result.history[-1]
    pooled = fs.evaluate_pooled(model, result.params, success)
    np.testing.assert_allclose(rec["attack_success"]["accuracy"], pooled["accuracy"],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="eval_extra needs eval_data"):
        fs.Simulation(algo, train, cohort_size=6, eval_extra={"a": success})
    with pytest.raises(ValueError, match="record's own keys"):
        fs.Simulation(algo, train, cohort_size=6, eval_data=test, eval_extra={"eval": success})


def test_bad_input(adversary, data):
    with pytest.raises(ValueError, match="fraction"):
        at.Adversary.choose(N, 1.5)
    with pytest.raises(ValueError, match="more than the cohort"):
        adversary.sampler(4, 5)
    with pytest.raises(ValueError, match="6 malicious"):
        adversary.sampler(10, 7)
    with pytest.raises(ValueError, match="target"):
        at.label_flip(10, source=1, target=10)
    with pytest.raises(ValueError, match="target"):
        at.backdoor(62, 62)
    with pytest.raises(ValueError, match="fraction"):
        at.backdoor(1, 62, fraction=0.0)
    with pytest.raises(ValueError, match="fraction"):
        at.Adversary.choose(N, -0.1)
    with pytest.raises(ValueError, match="for 24 clients"):
        at.poison(fs.data.synthetic(1.0, 1.0, num_clients=5, seed=0)[0], adversary,
                  at.label_flip(10))
    with pytest.raises(ValueError, match="both source and target"):
        at.label_flip(10, source=1)
    with pytest.raises(ValueError, match="does not fit"):
        at.backdoor(1, 62, image_shape=(28, 28), size=29)
    with pytest.raises(ValueError, match="not images"):
        at.poison(data[0], adversary, at.backdoor(1, 10))
    with pytest.raises(TypeError, match="one reduction stage"):
        at.alie(adversary, A.default())
    with pytest.raises(TypeError, match="reduction stage"):
        at.alie(adversary, A.clip(1.0))



@pytest.mark.slow
def test_femnist_attacks_example_quick(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    data = root.parent / "shared" / "data" / "femnist_leaf" / "femnist_leaf_sf005_105writers.npz"
    if not data.is_file():
        pytest.skip("needs ../shared/data/femnist_leaf")
    out = tmp_path / "attacks"
    monkeypatch.setattr(sys, "argv", ["femnist_attacks.py", "--quick", "--path", str(data),
                                      "--out", str(out)])
    runpy.run_path(str(root / "examples" / "femnist_attacks.py"), run_name="__main__")
    cells = json.loads(out.with_suffix(".json").read_text())["cells"]
    assert {c["attack"] for c in cells} == {"none", "scaling", "alie"}
    assert all(0 <= c["accuracy"] <= 1 for c in cells)
    assert all(c["success"] is not None for c in cells if c["attack"] == "scaling")
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "scaling breaks the mean: " in out.with_suffix(".md").read_text()


CLI_ARGS = ["run", "--rounds", "2", "--num-clients", "30", "--cohort-size", "10",
            "--eval-every", "0", "--fine-tune-steps", "0", "--no-progress", "--chunk-size", "2"]


def test_cli_runs_an_attack_against_a_defence_and_reports_its_success(tmp_path, capsys):
    from fedjax_sim import cli

    assert cli.main(CLI_ARGS + ["--attack", "label_flip", "--malicious-fraction", "0.3",
                                "--aggregator", "median", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "attack label_flip against the median: 9 of 30 clients malicious, 3 of the 10" in out
    summary = json.loads((tmp_path / "summary.json").read_text())["attack"]
    assert len(summary["malicious_clients"]) == 9 and 0 <= summary["success"] <= 1
    # ALIE wraps the defence; an update attack goes first, before the mask.
    from fedjax_sim import experiment

    def chain(*flags):
        return experiment.build(cli.resolve(cli.build_parser().parse_args(
            CLI_ARGS + list(flags)))).chain

    assert chain("--attack", "alie", "--aggregator", "median").aggregator.reduction == "rows"
    scaling = chain("--attack", "scaling")
    assert scaling.aggregator.reduction == "sum"
    assert sum(scaling.adversary.mask[scaling.sampling["sampler"].sample(0, 1)]) == 1
    for flags, message in [(["--malicious-fraction", "1.5"], "must be in \\[0, 1\\]"),
                           (["--aggregator", "median", "--dp-clip", "1", "--noise-multiplier",
                             "1"], "replaces the mean that dp_fedavg noises")]:
        with pytest.raises(SystemExit):
            cli.main(CLI_ARGS + ["--attack", "sign_flip", *flags, "--output-dir",
                                 str(tmp_path / "x")])
        assert message.replace("\\", "") in capsys.readouterr().err
