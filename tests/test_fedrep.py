"""FedRep and FedPer: the vectorized round against the plain reference (body averaged, heads
personal), heads of clients never sampled untouched, the server's head fixed, bad filters."""

import jax
import numpy as np
import optax
import pytest
from test_scaffold import population

import fedjax_sim as fs
from fedjax_sim import filters
from fedjax_sim.engine import Engine, client_mesh
from fedjax_sim.testing import (
    check_personal_evaluation,
    check_rounds_against_reference,
    reference_body_head_round,
)

RTOL, ATOL = 1e-5, 1e-6
HEAD = "Dense_1"  # the MLP's last layer


@pytest.mark.parametrize("name, chunk, devices", [("fedrep", 1, 1), ("fedrep", 3, 1),
                                                  ("fedrep", 1, 8), ("fedper", 3, 1)])
def test_matches_the_reference_round_after_round(name, chunk, devices):
    data = population()  # ragged: 1 to 17 examples
    model = fs.models.mlp(5, 3, hidden=(4,))
    opt, server = optax.sgd(0.2, momentum=0.5), optax.adam(0.05)
    head_steps = 2 if name == "fedrep" else None
    make = getattr(fs.algorithms, name)
    algo = make(model, opt, server, head=HEAD, batch_size=4, num_epochs=2,
                **({"head_steps": head_steps} if head_steps else {}))
    engine = Engine(chunk, client_mesh() if devices == 8 else None)
    params = jax.jit(model.init)(jax.random.key(2))
    is_head = filters.mask(HEAD, params)
    state, _, _ = check_rounds_against_reference(
        algo, data, params, engine,
        lambda ref, cohort, pool, key: reference_body_head_round(
            model, opt, server, *ref, cohort, pool, key, cohort.batch_size, data.num_clients,
            is_head, head_steps),
        (params, server.init(params), {}))
    # The server's head never moves.
    np.testing.assert_array_equal(state.params[HEAD]["kernel"], params[HEAD]["kernel"])


def test_the_body_is_what_clients_send_and_personal_evaluation_uses_each_head():
    train, test = fs.data.synthetic(1.0, 1.0, num_clients=10, seed=0)
    model = fs.models.mlp(60, 10, hidden=(16,))
    algo = fs.algorithms.fedrep(model, optax.sgd(0.05), head=HEAD, head_steps=5,
                                batch_size=10)
    assert algo.trained.params == 60 * 16 + 16  # the body only goes up
    result = fs.simulate(algo, train, rounds=4, cohort_size=5, eval_data=test, chunk_size=2,
                         progress=False)
    check_personal_evaluation(algo, result, train, test)


def test_bad_heads_are_named():
    model = fs.models.mlp(5, 3, hidden=(4,))
    with pytest.raises(ValueError, match="matches no|selects nothing"):
        fs.algorithms.fedrep(model, optax.sgd(0.1), head="Dense_7")
    with pytest.raises(ValueError, match="nothing is left to share"):
        fs.algorithms.fedper(model, optax.sgd(0.1), head="Dense")
    with pytest.raises(ValueError, match="head_steps"):
        fs.algorithms.fedrep(model, optax.sgd(0.1), head=HEAD, head_steps=0)
