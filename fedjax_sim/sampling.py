"""Samplers: which clients each round trains, as values, every draw seeded by (seed, round).

A `Sampler` returns the population positions of round r's cohort; every round's program is
compiled for `max_size` clients, and a draw of fewer (Poisson sampling) is padded with clients
of weight 0, so the cohort's size may vary round to round without a recompile. A sampler with
a `device` draw (`on_device`) can also run inside a compiled program, which is how many rounds
run in one call (`Simulation(rounds_per_call=...)`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.checks import check_integer


class Participation(NamedTuple):
    """How a sampler lets a client take part, as a privacy accountant needs it.

    Attributes:
      kind: "poisson" (each client independently with probability `size / num_clients`
        each round), "fixed" (`size` clients uniformly without replacement each round), or
        "cyclic" (each client at most once every `num_clients // size` rounds).
      num_clients: the population N.
      size: the (expected) cohort size.
    """

    kind: Literal["poisson", "fixed", "cyclic"]
    num_clients: int
    size: float

    @property
    def rate(self) -> float:
        return self.size / self.num_clients


class Sampler(NamedTuple):
    """Attributes:
    sample: `(seed, round) -> int64[n]` population positions, `n <= max_size`.
    max_size: the most clients a round can hold (the padded cohort the round compiles for).
    name: e.g. "uniform(100)", for records and errors.
    participation: how clients take part, for the privacy accountant; None where no
      accountant covers the sampling (with replacement, by size).
    device: `(seed, round) -> i32[max_size]` in jnp, the same draw as `sample` for a traced
      seed (uint32) and round number, run inside a compiled program; None for a sampler
      that draws on the host only.
    """

    sample: Callable[[int, int], np.ndarray]
    max_size: int
    name: str
    participation: Participation | None = None
    device: Callable[[int, jax.Array], jax.Array] | None = None


def uniform(num_clients: int, cohort_size: int) -> Sampler:
    """`cohort_size` clients, uniformly without replacement (FedAvg's sampling)."""
    check_integer("cohort_size", cohort_size, 1)
    if cohort_size > num_clients:
        raise ValueError(f"cohort_size {cohort_size} is larger than the population of "
                         f"{num_clients} clients")

    def sample(seed, round_num):
        return np.random.default_rng([seed, round_num]).choice(num_clients, cohort_size,
                                                               replace=False)

    return Sampler(sample, cohort_size, f"uniform({cohort_size})",
                   Participation("fixed", num_clients, cohort_size))


# Folded into the seed's key before the round: the round's training key is the seed's key
# folded with the round alone (`base.round_key`), which the cohort's draw must not reuse.
_COHORT_KEY = 0x636F686F  # "coho"


def on_device(num_clients: int, cohort_size: int) -> Sampler:
    """`cohort_size` clients uniformly without replacement, drawn with `jax.random` from the
    round's key (`fold_in(fold_in(key(seed), salt), round)`), so a compiled program can draw
    them itself: `Simulation(rounds_per_call=N)` runs N rounds in one `lax.scan`. Round by
    round (`sample`) it draws the same clients on the host, so the two runs are comparable.
    Other draws than `uniform`'s (numpy's), for the same seed.

    Example:
      >>> s = on_device(1000, 10)
      >>> ids = s.sample(0, 3)                      # numpy, i64[10]
      >>> same = s.device(0, jnp.int32(3))          # jnp, also inside jit or lax.scan
    """
    check_integer("cohort_size", cohort_size, 1)
    if cohort_size > num_clients:
        raise ValueError(f"cohort_size {cohort_size} is larger than the population of "
                         f"{num_clients} clients")

    def device(seed, round_num):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _COHORT_KEY),
                                 round_num)
        return jax.random.choice(key, num_clients, (cohort_size,),
                                 replace=False).astype(jnp.int32)

    drawn = jax.jit(device)  # one program for every seed and round

    def sample(seed, round_num):
        return np.asarray(drawn(np.uint32(seed), np.int32(round_num)), np.int64)

    return Sampler(sample, cohort_size, f"on_device({cohort_size})",
                   Participation("fixed", num_clients, cohort_size), device)


def with_replacement(num_clients: int, cohort_size: int) -> Sampler:
    """`cohort_size` draws, uniformly with replacement: a client drawn twice trains twice."""
    check_integer("cohort_size", cohort_size, 1)

    def sample(seed, round_num):
        return np.random.default_rng([seed, round_num, 1]).integers(0, num_clients, cohort_size)

    return Sampler(sample, cohort_size, f"with_replacement({cohort_size})")


def poisson(num_clients: int, expected_size: float) -> Sampler:
    """Each client independently with probability q = expected_size / num_clients (the
    sampling that DP's amplification by subsampling assumes). The round compiles for a bound
    the draw exceeds with probability below 1e-11 (7 standard deviations); a draw past it
    is refused rather than cut, since cutting would break the accounting."""
    if not isinstance(expected_size, int | float) or not 0 < expected_size <= num_clients:
        raise ValueError(f"poisson: expected_size must be in (0, {num_clients}] (the "
                         f"population), got {expected_size!r}")
    q = expected_size / num_clients
    bound = min(num_clients, math.ceil(expected_size + 7 * math.sqrt(expected_size * (1 - q))
                                       + 1))

    def sample(seed, round_num):
        drawn = np.random.default_rng([seed, round_num, 2]).random(num_clients) < q
        picked = np.flatnonzero(drawn)
        if len(picked) > bound:
            raise RuntimeError(f"poisson sampling drew {len(picked)} clients in round "
                               f"{round_num}, past the bound {bound} the round compiled for")
        return picked

    return Sampler(sample, bound, f"poisson(q={q:g})",
                   Participation("poisson", num_clients, expected_size))


def cyclic(num_clients: int, cohort_size: int) -> Sampler:
    """The population shuffled once (by the seed) and cut into `num_clients // cohort_size`
    cohorts taken in turn, so each client trains at most once per cycle of that many rounds
    (DP-FTRL's participation, Kairouz et al. 2021); the `num_clients % cohort_size` clients
    left over never train."""
    check_integer("cohort_size", cohort_size, 1)
    if cohort_size > num_clients:
        raise ValueError(f"cohort_size {cohort_size} is larger than the population of "
                         f"{num_clients} clients")
    cycle = num_clients // cohort_size

    def sample(seed, round_num):
        order = np.random.default_rng([seed, 4]).permutation(num_clients)
        i = round_num % cycle
        return order[i * cohort_size:(i + 1) * cohort_size]

    return Sampler(sample, cohort_size, f"cyclic({cohort_size})",
                   Participation("cyclic", num_clients, cohort_size))


def by_size(num_examples: np.ndarray, cohort_size: int) -> Sampler:
    """`cohort_size` clients without replacement, each with probability proportional to its
    number of examples."""
    num_examples = np.asarray(num_examples, np.float64)
    check_integer("cohort_size", cohort_size, 1)
    if cohort_size > int(np.sum(num_examples > 0)):
        raise ValueError(f"cohort_size {cohort_size} is larger than the {len(num_examples)} "
                         "clients with examples")
    p = num_examples / num_examples.sum()

    def sample(seed, round_num):
        return np.random.default_rng([seed, round_num, 3]).choice(len(p), cohort_size,
                                                                  replace=False, p=p)

    return Sampler(sample, cohort_size, f"by_size({cohort_size})")


def sample_cohort(num_clients: int, cohort_size: int, seed: int, round_num: int) -> np.ndarray:
    """Population positions of round `round_num`'s cohort: uniform, without replacement."""
    return uniform(num_clients, cohort_size).sample(seed, round_num)
