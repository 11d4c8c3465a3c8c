"""HypCluster and IFCA: the vectorized round against the plain reference, two groups of
opposite labels separated (the papers' behaviour), an unchosen cluster kept bitwise, one
cluster as FedAvg, personalized evaluation by cluster, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_scaffold import population

import fedjax_sim as fs
from fedjax_sim import client_store
from fedjax_sim.data.cohort import resident_order
from fedjax_sim.engine import Engine, client_mesh, replicate
from fedjax_sim.evaluation import Evaluator
from fedjax_sim.rounds import RoundRunner, new_store
from fedjax_sim.testing import (
    assert_trees_close,
    assert_trees_equal,
    reference_clustered_round,
)

RTOL, ATOL = 1e-5, 1e-6


def distinct(model, k, seed=0, scale=0.5):
    """k random models stacked (the zoo's logistic regression initializes to zeros)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(scale=scale, size=(k, *p.shape)),
                                              p.dtype), model.init(None))


def row(stack, j):
    return jax.tree.map(lambda p: p[j], stack)


@pytest.mark.parametrize("name, chunk, devices",
                         [("hypcluster", 1, 1), ("ifca", 3, 1), ("hypcluster", 1, 8)])
def test_rounds_match_the_reference_round_after_round(name, chunk, devices):
    data = population()  # ragged: 1 to 17 examples
    model = fs.models.logistic_regression(5, 3)
    client, server, k = optax.sgd(0.3), optax.sgd(0.8, momentum=0.5), 4
    algo = getattr(fs.algorithms, name)(model, client, k, server, batch_size=4, num_epochs=2)
    weighting = "num_examples" if name == "hypcluster" else "uniform"
    engine = Engine(chunk, client_mesh() if devices == 8 else None)
    params, key = distinct(model, k), jax.random.key(3)
    state = replicate(algo.init(params, key), engine)
    store = new_store(algo, data, params, engine)
    runner = RoundRunner(algo, data, 5, engine, seed=0, pool=replicate(data.features, engine))
    ref = ([row(params, j) for j in range(k)], [server.init(row(params, j)) for j in range(k)])
    rng, last, unchosen = np.random.default_rng(1), {}, 0
    for r in range(4):
        indices = rng.choice(data.num_clients, 5, replace=False)
        cohorts, rows = runner.packer.pack(indices, seed=0, round_num=r)
        state, store, metrics = runner(state, store, runner.packer.place(cohorts, rows))
        loss_cohort, cohort = (resident_order(c, x) for c, x in zip(cohorts, rows, strict=True))
        *ref, chosen = reference_clustered_round(
            model, client, server, *ref, loss_cohort, cohort, dict(data.features),
            jax.random.fold_in(key, r), 4, weighting, r)
        for j in range(k):
            assert_trees_close(row(state.params, j), ref[0][j], RTOL, ATOL,
                               what=f"round {r} cluster {j}")
        ids, clusters = (np.asarray(metrics.clients[x]) for x in ("client_ids", "cluster"))
        real = {int(i): int(c) for i, c in zip(ids, clusters, strict=True)
                if i < data.num_clients}
        assert real == {i: chosen[i] for i in real}
        last.update(real)
        unchosen += sum(int(metrics.server[f"cluster_{j}_clients"]) == 0 for j in range(k))
    assert len(set(last.values())) > 1 and unchosen  # the keep rule ran, with momentum
    # The store holds each sampled client's last choice; the others were never written.
    rows = client_store.gather(store, jnp.arange(data.num_clients), jnp.int32(-7))
    assert np.asarray(rows).tolist() == [last.get(i, -7) for i in range(data.num_clients)]


def two_groups(seed, clients_per_group=4, n=30):
    """Clients of group 1 have the opposite labels of group 0's (one rule, flipped): no single
    linear model fits both."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=5)
    train, test = {}, {}
    for g in (0, 1):
        for i in range(clients_per_group):
            for split in (train, test):
                x = rng.normal(size=(n, 5)).astype(np.float32)
                y = (x @ w > 0).astype(np.int32)
                split[f"g{g}c{i}"] = {"x": x, "y": y if g == 0 else 1 - y}
    return fs.data.from_client_dict(train), fs.data.from_client_dict(test)


def accuracy(params, client):
    logits = client["x"] @ np.asarray(params["w"]) + np.asarray(params["b"])
    return float(np.mean(np.argmax(logits, -1) == client["y"]))


def mean_loss(params, client):
    logits = client["x"] @ np.asarray(params["w"]) + np.asarray(params["b"])
    top = logits.max(-1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(-1))
    return float(np.mean(lse - logits[np.arange(len(logits)), client["y"]]))


@pytest.fixture(scope="module")
def separated():
    """Six rounds of IFCA with k = 2 on the two groups, evaluated after the last."""
    train, test = two_groups(seed=0)
    model = fs.models.logistic_regression(5, 2)
    algo = fs.algorithms.ifca(model, optax.sgd(0.5), 2, batch_size=10)
    result = fs.simulate(algo, train, rounds=6, cohort_size=4, params=distinct(model, 2),
                         eval_data=test, chunk_size=2, progress=False)
    return algo, train, test, result


def test_two_groups_of_opposite_labels_each_choose_their_own_model(separated):
    algo, train, test, result = separated
    last = result.history[-1]
    stored = np.asarray(client_store.gather(result.store, jnp.arange(train.num_clients),
                                            jnp.int32(-1)))
    group = np.array([cid.startswith("g1") for cid in train.client_ids])
    assert len(set(stored[~group])) == 1 and len(set(stored[group])) == 1
    assert stored[0] != stored[-1]  # one cluster per group
    # Each client is evaluated with its cluster's model, and that model fits its group.
    own = last["eval_personal_clients"]
    for i, cid in enumerate(own["client_id"]):
        j = stored[train.index_of([cid])[0]]
        expected = accuracy(row(result.params, j), test.client(test.index_of([cid])[0]))
        assert own["accuracy"][i] == pytest.approx(expected)
    assert last["eval_personal"]["accuracy"]["mean"] > 0.85  # 0.89-0.98 over seeds 0-7
    assert last["eval"]["accuracy"]["mean"] < 0.6  # cluster 0 fits one group only


def test_a_client_never_sampled_is_evaluated_with_its_cluster_of_lowest_training_loss(
        separated):
    algo, train, test, result = separated
    evaluator = Evaluator(algo.model, test, train=train, personal=algo.personal,
                          client_state=algo.client_state, personal_pass=algo.personal_pass)
    unsampled = new_store(algo, train, result.params, Engine())  # no row written
    own = evaluator(result.params, unsampled)
    stored = np.asarray(client_store.gather(result.store, jnp.arange(train.num_clients),
                                            jnp.int32(-1)))
    for i, cid in enumerate(own.clients["client_id"]):
        mine = train.client(train.index_of([cid])[0])
        j = int(np.argmin([mean_loss(row(result.params, j), mine) for j in range(2)]))
        assert j == stored[train.index_of([cid])[0]]  # its choice in training
        expected = accuracy(row(result.params, j), test.client(test.index_of([cid])[0]))
        assert own.clients["accuracy"][i] == pytest.approx(expected)


def test_a_cluster_no_client_chose_keeps_its_model_and_optimizer_state_bitwise():
    data = population()
    model = fs.models.logistic_regression(5, 3)
    params = distinct(model, 3)
    # Cluster 2 says class 0 with a margin of 100: no client's data has a lower loss under it.
    params["b"] = params["b"].at[2].set(jnp.array([50.0, -50.0, -50.0]))
    algo = fs.algorithms.hypcluster(model, optax.sgd(0.1), 3, optax.adam(0.05), batch_size=4)
    result = fs.simulate(algo, data, rounds=3, cohort_size=data.num_clients, params=params,
                         chunk_size=2, progress=False)
    assert all(rec["server"]["cluster_2_clients"] == 0 for rec in result.history)
    initial = algo.init(params, jax.random.key(0))
    assert_trees_equal(row(result.params, 2), row(params, 2), what="cluster 2's model")
    assert_trees_equal(row(result.state.opt_state, 2), row(initial.opt_state, 2),
                       what="cluster 2's Adam state")
    for j in (0, 1):
        assert not np.array_equal(result.params["w"][j], params["w"][j])


def test_a_host_store_gives_the_device_stores_bits():
    data = population()
    model = fs.models.logistic_regression(5, 3)
    algo = fs.algorithms.ifca(model, optax.sgd(0.3), 3, batch_size=4)
    run = lambda where: fs.simulate(algo, data, rounds=3, cohort_size=5,
                                    params=distinct(model, 3), chunk_size=2, progress=False,
                                    client_store=where)
    device, host = run("device"), run("host")
    assert_trees_equal(host.params, device.params)
    everyone = jnp.arange(data.num_clients)
    assert (np.asarray(host.store.table).tolist()
            == np.asarray(client_store.gather(device.store, everyone, jnp.int32(0))).tolist())
    assert host.store.written.tolist() == np.asarray(device.store.written).tolist()


@pytest.mark.parametrize("name, weighting", [("hypcluster", "num_examples"),
                                             ("ifca", "uniform")])
def test_one_cluster_is_fedavg(name, weighting):
    data = population()
    model = fs.models.logistic_regression(5, 3)
    params = row(distinct(model, 1), 0)
    run = lambda algo, p: fs.simulate(algo, data, rounds=3, cohort_size=4, params=p,
                                      chunk_size=2, progress=False)
    clustered = run(getattr(fs.algorithms, name)(model, optax.sgd(0.2), 1, optax.adam(0.1),
                                                 batch_size=4),
                    jax.tree.map(lambda p: p[None], params))
    fedavg = run(fs.algorithms.fedavg(model, optax.sgd(0.2), optax.adam(0.1), batch_size=4,
                                      client_weighting=weighting), params)
    assert_trees_close(row(clustered.params, 0), fedavg.params, RTOL, ATOL)


def test_bad_numbers_of_clusters_are_refused_before_anything_compiles():
    model = fs.models.logistic_regression(5, 3)
    with pytest.raises(ValueError, match="num_clusters must be >= 1"):
        fs.algorithms.ifca(model, optax.sgd(0.1), 0)
    with pytest.raises(TypeError, match="num_clusters must be an integer"):
        fs.algorithms.hypcluster(model, optax.sgd(0.1), 2.0)
    data = population()  # 8 clients
    algo = fs.algorithms.ifca(model, optax.sgd(0.1), 9)
    with pytest.raises(ValueError, match="num_clusters=9 is more than the 8 clients"):
        fs.Simulation(algo, data, cohort_size=2, progress=False)
    with pytest.raises(ValueError, match=r"leaf 'b' has shape \(3,\) where the model's init "
                       r"gives \(2, 3\)"):  # one model's params, not a stack of two
        fs.Simulation(fs.algorithms.ifca(model, optax.sgd(0.1), 2), data, cohort_size=2,
                      params=model.init(None), progress=False)
