"""Privacy auditing with canary clients: an empirical epsilon from the final model, to set
beside the accountant's.

The one-shot, final-model estimate of Andrew et al. (2024): `m` canary clients join the
population and are sampled like any client; a canary's update is always its own fixed random
direction (uniform on the unit sphere of all the params, scaled to the clip norm), whatever it
trained. After the run, each direction's cosine with the server's total movement scores it:
the inserted canaries' scores against those of `m'` directions never inserted (held out).
Gaussians fitted to the two score sets give the estimate: the epsilon at `delta` for which the
two Gaussians are (epsilon, delta)-indistinguishable. A non-private run shows a large
estimate, a correct DP run one below the accountant's epsilon (which covers an adversary who
sees every round, not only the final model); an estimate above the accountant's says the
implementation leaks more than it accounts for. The estimate is not a bound: with m canaries
its spread is about 1/sqrt(m) in the fitted means and stds (measured: 200 canaries, DP-FedAvg
at noise 0.7 on logistic regression, estimates 2.4-3.8 over ten seeds). And the final model
hides a canary among the real clients' common movement: on that 610-parameter model, noise
0.1 claimed as 0.7 gave estimates of only 6.5-8.7 against the claimed 6.2 (50 canaries, four
seeds), so a small model detects a gross under-noising, not a subtle one.

Beside the estimate, jax-privacy's `CanaryScoreAuditor` gives an assumption-free lower bound
that holds with confidence `1 - significance` (Clopper-Pearson intervals on the best
threshold test's error rates; with few canaries it cannot exceed a few units).

Example:
  >>> import optax, fedjax_sim as fs                                       # doctest: +SKIP
  >>> train, _ = fs.data.synthetic(num_clients=300, seed=0)
  >>> train, canaries = fs.auditing.with_canaries(train, 50, seed=1)
  >>> z, c, q = 1.0, 0.5, 30
  >>> agg = fs.aggregators.chain(fs.auditing.canary_stage(canaries, c),
  ...     fs.aggregators.clip(c), fs.aggregators.weight_by("uniform"),
  ...     fs.aggregators.dp_mean(z, c, q))
  >>> algo = fs.algorithms.fedavg(fs.models.logistic_regression(60, 10), optax.sgd(0.1),
  ...                              aggregator=agg)
  >>> sampler = fs.sampling.poisson(train.num_clients, q)
  >>> params = algo.model.init(None)
  >>> result = fs.simulate(algo, train, rounds=30, sampler=sampler, params=params)
  >>> fs.auditing.report(params, result, canaries, algo, sampler)

References:
  Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot Empirical Privacy Estimation
    for Federated Learning", ICLR 2024 (arXiv:2302.03098): the canaries, the cosine score
    and the estimate of the two fitted Gaussians (Section 4, the final-model threat model).
  Jagielski, Ullman, Oprea, "Auditing Differentially Private Machine Learning: How Private
    is Private SGD?", NeurIPS 2020: the Clopper-Pearson lower bound (via jax-privacy).
  Balle, Wang, "Improving the Gaussian Mechanism for Differential Privacy: Analytical
    Calibration and Optimal Denoising", ICML 2018: delta(epsilon) as the hockey-stick
    divergence of the two output distributions (Theorem 5).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.aggregators import Aggregator, stage
from fedjax_sim.algorithms.base import FederatedAlgorithm
from fedjax_sim.checks import check_data, check_integer, check_number
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.privacy import Ledger, check_delta, default_delta
from fedjax_sim.sampling import Sampler
from fedjax_sim.simulation import SimulationResult

CANARY_PREFIX = "canary:"


class Canaries(NamedTuple):
    """Which population positions are canaries, and what draws their directions.

    Attributes:
      first: the population position of canary 0; canary i is at `first + i`.
      count: the number of canaries inserted, m.
      seed: direction i is drawn from `fold_in(key(seed), i)`: i < count for the inserted
        canaries, i >= count for held-out ones, so no direction is stored anywhere.
    """

    first: int
    count: int
    seed: int

    @property
    def positions(self) -> np.ndarray:
        return np.arange(self.first, self.first + self.count)


def with_canaries(train: FederatedData, num_canaries: int, seed: int) -> tuple[FederatedData,
                                                                               Canaries]:
    """`train` with `num_canaries` canary clients appended (positions N..N+m-1, ids
    "canary:i"), and their description for `canary_stage` and `empirical_epsilon`.

    A canary holds one copy of the population's first example, so it packs and trains like
    any client; `canary_stage` then replaces what it sends. Canaries may not outnumber the
    clients they audit (they would be most of every cohort). The columns are copied into
    memory.
    """
    train = check_data("train", train)
    n = train.num_clients
    m = check_integer("num_canaries", num_canaries, 2)
    if m > n:
        raise ValueError(f"num_canaries {m} is more than the {n} clients of train: canaries "
                         "may not outnumber the population they audit")
    seed = check_integer("seed", seed, 0, 2**32 - 1)
    ids = np.array([f"{CANARY_PREFIX}{i}" for i in range(m)])
    taken = np.isin(ids, train.client_ids.astype(str))
    if taken.any():
        raise ValueError(f"train already has a client named {str(ids[taken][0])!r}: canary ids "
                         f"are {CANARY_PREFIX!r} + index")
    total = train.total_examples
    features = {k: np.concatenate([np.asarray(v[np.arange(total)]),
                                   np.repeat(np.asarray(v[np.arange(1)]), m, axis=0)])
                for k, v in train.features.items()}
    offsets = np.concatenate([train.offsets, total + np.arange(1, m + 1)])
    data = FederatedData(np.concatenate([train.client_ids.astype(str), ids]), features, offsets)
    return data, Canaries(n, m, seed)


def direction(seed: int | jax.Array, index: int | jax.Array, template: Any) -> Any:
    """Canary direction `index`: a tree like `template` (float32 leaves), uniform on the unit
    sphere of all its entries together (one normal vector over its norm, cut into the
    leaves: one draw compiles in half the time of one per leaf)."""
    leaves, treedef = jax.tree.flatten(template)
    sizes = [math.prod(jnp.shape(x)) for x in leaves]
    flat = jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), (sum(sizes),),
                             jnp.float32)
    flat = flat / jnp.sqrt(jnp.sum(jnp.square(flat)))
    cuts = np.cumsum(sizes)[:-1].tolist()
    return jax.tree.unflatten(treedef, [part.reshape(jnp.shape(x)) for part, x in
                                        zip(jnp.split(flat, cuts), leaves, strict=True)])


def canary_stage(canaries: Canaries, norm: float) -> Aggregator:
    """A chain stage that makes each canary client send `norm` times its direction, whatever
    it trained; every other client passes unchanged. Put it before `clip` with `norm` the
    clip norm, so a canary is a client at the sensitivity the accountant assumes. Each
    client draws a normal vector of the params' size (kept only by the canaries): an audited
    round does that much more work per client.

    Example:
      >>> agg = chain(canary_stage(canaries, 0.5), clip(0.5), weight_by("uniform"),
      ...             dp_mean(1.0, 0.5, 30))                              # doctest: +SKIP
    """
    if not isinstance(canaries, Canaries):
        raise TypeError(f"canaries must be the Canaries that with_canaries returned, got "
                        f"{type(canaries).__name__}")
    norm = check_number("norm", norm, above=0)
    first, count, seed = canaries

    def client(output, weight, ctx, state):
        index = ctx.id - first
        is_canary = (index >= 0) & (index < count)
        d = direction(seed, index, output)  # drawn for every client: vmapped, where selects
        output = jax.tree.map(lambda o, u: jnp.where(is_canary, (norm * u).astype(o.dtype), o),
                              output, d)
        return output, weight, {"canary": is_canary}

    return stage("canaries", client=client)


class Audit(NamedTuple):
    """What `empirical_epsilon` found.

    Attributes:
      epsilon: Andrew et al.'s estimate: the epsilon at `delta` of the two fitted Gaussians.
      epsilon_lower_bound: jax-privacy's Clopper-Pearson lower bound, which holds with
        confidence `1 - significance` whatever the score distributions.
      delta, significance: as asked.
      in_scores: f64[m], the inserted canaries' cosines with the server's movement.
      out_scores: f64[m'], the held-out directions'.
      mu: (mean(in) - mean(out)) / std(out), the canaries' separation in held-out standard
        deviations (the Gaussian mechanism's sensitivity over noise when the two stds agree).
    """

    epsilon: float
    epsilon_lower_bound: float
    delta: float
    significance: float
    in_scores: np.ndarray
    out_scores: np.ndarray
    mu: float


def scores(initial_params: Any, final_params: Any, canaries: Canaries,
           num_held_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of the directions with `initial_params - final_params`: the server moves
    against the clients' pseudo-gradients (`server - client`), so an inserted canary pushes
    the params along minus its direction. (inserted canaries' [m], held-out ones' [m'])."""
    if not isinstance(canaries, Canaries):
        raise TypeError(f"canaries must be the Canaries that with_canaries returned, got "
                        f"{type(canaries).__name__}")
    num_held_out = check_integer("num_held_out", num_held_out, 2)
    initial, final = jax.tree.structure(initial_params), jax.tree.structure(final_params)
    if initial != final:
        raise ValueError(f"initial_params and final_params are different trees: {initial} "
                         f"against {final}")
    shapes = [(jnp.shape(a), jnp.shape(b)) for a, b in zip(jax.tree.leaves(initial_params),
                                                          jax.tree.leaves(final_params),
                                                          strict=True)]
    if any(a != b for a, b in shapes):
        raise ValueError(f"initial_params and final_params have leaves of other shapes: "
                         f"{[s for s in shapes if s[0] != s[1]][:3]}")
    moved = jax.tree.map(lambda a, b: jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32),
                         initial_params, final_params)
    length = float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(moved))))
    if not length > 0 or not math.isfinite(length):
        raise ValueError(f"the params moved by {length:g} (initial to final): there is no "
                         "direction to score the canaries against")

    total = canaries.count + num_held_out
    padded = -(-total // _SCORE_BATCH) * _SCORE_BATCH  # one batch shape: one compiled body
    all_scores = np.asarray(_cosines(canaries.seed, moved, jnp.arange(padded)),
                            np.float64)[:total] / length
    return all_scores[:canaries.count], all_scores[canaries.count:]


_SCORE_BATCH = 64  # directions drawn at once: [64, P] floats, whatever the number of them


@partial(jax.jit, static_argnums=0)  # a seed past int32 is no traced argument
def _cosines(seed, moved, indices):
    """<direction(seed, i), moved> for each i (in batches, so memory stays [64, P])."""
    def one(i):
        d = direction(seed, i, moved)
        return sum(jnp.vdot(u, x) for u, x in zip(jax.tree.leaves(d), jax.tree.leaves(moved),
                                                  strict=True))
    return jax.lax.map(one, indices, batch_size=_SCORE_BATCH)


def empirical_epsilon(initial_params: Any, final_params: Any, canaries: Canaries,
                      delta: float, *, num_held_out: int = 1000,
                      significance: float = 0.05) -> Audit:
    """The empirical epsilon at `delta` of a run with `canaries`, from its initial and final
    params alone (the final-model threat model): Andrew et al.'s estimate from the canaries'
    scores against `num_held_out` held-out directions, and a confident lower bound."""
    delta = check_delta(delta)
    significance = check_number("significance", significance, above=0)
    if significance >= 0.5:
        raise ValueError(f"significance must be in (0, 0.5), got {significance!r}")
    inside, outside = scores(initial_params, final_params, canaries, num_held_out)
    try:
        from jax_privacy.auditing import CanaryScoreAuditor
    except ImportError as e:
        raise ImportError("the confident lower bound needs jax-privacy: pip install "
                          "'fedjax_sim[privacy]' (or pip install jax-privacy)") from e
    bound = CanaryScoreAuditor(inside, outside).epsilon_clopper_pearson(significance, delta)
    mean_out, std_out = outside.mean(), outside.std(ddof=1)
    return Audit(epsilon=epsilon_from_scores(inside, outside, delta),
                 epsilon_lower_bound=float(bound), delta=delta, significance=significance,
                 in_scores=inside, out_scores=outside,
                 mu=float((inside.mean() - mean_out) / std_out))


def epsilon_from_scores(in_scores, out_scores, delta: float) -> float:
    """Andrew et al.'s estimate: Gaussians N(mean, std^2) fitted to the inserted canaries'
    and the held-out directions' scores, and the epsilon at `delta` between them
    (`epsilon_of_gaussians`)."""
    delta = check_delta(delta)
    fitted = []
    for name, s in (("in_scores", in_scores), ("out_scores", out_scores)):
        s = np.asarray(s, np.float64)
        if s.ndim != 1 or len(s) < 2 or not np.isfinite(s).all():
            raise ValueError(f"{name} must be at least 2 finite numbers in a 1-D array, got "
                             f"shape {s.shape}")
        fitted.append((s.mean(), s.std(ddof=1)))
    (mean_in, std_in), (mean_out, std_out) = fitted
    return epsilon_of_gaussians(mean_out, std_out, mean_in, std_in, delta)


def epsilon_of_gaussians(mean_p: float, std_p: float, mean_q: float, std_q: float,
                         delta: float) -> float:
    """The smallest epsilon >= 0 for which P = N(mean_p, std_p^2) and Q = N(mean_q, std_q^2)
    are (epsilon, delta)-indistinguishable both ways: delta_{P,Q}(epsilon) and
    delta_{Q,P}(epsilon) at most `delta`, where delta_{P,Q}(epsilon) = P[L > epsilon] -
    e^epsilon Q[L > epsilon] is the hockey-stick divergence, L = log(p / q) (Balle and Wang
    2018, Theorem 5). L is quadratic in the output, so each side is a Gaussian mass over at
    most two intervals; equal stds give the Gaussian mechanism of sensitivity over noise
    |mean_p - mean_q| / std (no library covers unequal ones). inf if no finite epsilon does.
    """
    delta = check_delta(delta)
    for name, s in (("std_p", std_p), ("std_q", std_q)):
        check_number(name, s, above=0)
    check_number("mean_p", mean_p)
    check_number("mean_q", mean_q)
    p, q = (float(mean_p), float(std_p)), (float(mean_q), float(std_q))
    log_delta = math.log(delta)

    def worse(eps):  # the larger log delta of the two orders, minus the target
        return max(_log_hockey_stick(p, q, eps), _log_hockey_stick(q, p, eps)) - log_delta

    if worse(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while worse(hi) > 0:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            return math.inf
    from scipy.optimize import brentq

    return float(brentq(worse, lo, hi, xtol=1e-10, rtol=1e-12))


def _log_hockey_stick(p: tuple[float, float], q: tuple[float, float], eps: float) -> float:
    """log delta_{P,Q}(eps) (-inf where it is 0) for Gaussians p, q = (mean, std)."""
    (mp, sp), (mq, sq) = p, q
    # L(y) - eps = a y^2 + b y + c
    a = 0.5 / sq**2 - 0.5 / sp**2
    b = mp / sp**2 - mq / sq**2
    c = 0.5 * (mq / sq) ** 2 - 0.5 * (mp / sp) ** 2 + math.log(sq / sp) - eps
    inf = math.inf
    if a == 0:
        if b == 0:
            return -inf  # P = Q
        root = -c / b
        intervals = [(root, inf)] if b > 0 else [(-inf, root)]
    else:
        disc = b * b - 4 * a * c
        if disc <= 0:
            # L - eps has one sign everywhere: L > eps nowhere (a < 0), or everywhere
            # (a > 0), where P[.] - e^eps Q[.] = 1 - e^eps <= 0.
            return -inf
        r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
        intervals = [(-inf, r1), (r2, inf)] if a > 0 else [(r1, r2)]
    log_p = _log_mass(mp, sp, intervals)
    log_q = _log_mass(mq, sq, intervals)
    if log_p == -inf or eps + log_q >= log_p:
        return -inf
    return log_p + math.log1p(-math.exp(eps + log_q - log_p))


def _log_mass(mean: float, std: float, intervals: list[tuple[float, float]]) -> float:
    """log N(mean, std^2)[union of disjoint intervals], each from the nearer tail (no
    cancellation far out)."""
    from scipy.stats import norm

    logs = []
    for lo, hi in intervals:
        a, b = (lo - mean) / std, (hi - mean) / std
        if a > -b:  # mostly above the mean: the upper tails, sf(a) - sf(b)
            big, small = norm.logsf(a), norm.logsf(b)
        else:
            big, small = norm.logcdf(b), norm.logcdf(a)
        if small < big:
            logs.append(big + math.log1p(-math.exp(small - big)))
    return float(np.logaddexp.reduce(logs)) if logs else -math.inf


def report(initial_params: Any, result: SimulationResult, canaries: Canaries,
           algorithm: FederatedAlgorithm, sampler: Sampler, *,
           delta: float | None = None, num_held_out: int = 1000, significance: float = 0.05,
           verbose: bool = True) -> dict:
    """The empirical epsilon of a finished run beside the accountant's, at one delta.

    Args:
      initial_params: the params the run started from.
      result: its `SimulationResult` (the final params and the rounds run).
      canaries: the run's canaries (`with_canaries`).
      algorithm: the run's algorithm.
      sampler: the run's sampler.
      delta: default the accountant's (`fs.privacy.default_delta(N)`).
      verbose: print one line: the estimate, the confident lower bound and the accountant's
        epsilon (inf for a run whose chain has no DP stage).

    Returns:
      A dict of "empirical_epsilon", "epsilon_lower_bound", "accountant_epsilon", "delta",
        "rounds" and "audit" (the full `Audit`).
    """
    rounds = int(np.asarray(result.state.round))
    event = algorithm.aggregator.privacy
    if event is None:
        # canaries are the population's last clients: first + count is its size
        delta = default_delta(canaries.first + canaries.count) if delta is None else delta
        accountant = math.inf
    else:
        ledger = Ledger(event, sampler.participation, delta=delta, sampler_name=sampler.name)
        delta, accountant = ledger.delta, ledger.epsilon(rounds)
    audit = empirical_epsilon(initial_params, result.params, canaries, delta,
                              num_held_out=num_held_out, significance=significance)
    if verbose:
        print(f"after {rounds} rounds, at delta {delta:.3g}: empirical epsilon "
              f"{audit.epsilon:.3g} (Andrew et al.'s estimate from {canaries.count} "
              f"canaries), >= {audit.epsilon_lower_bound:.3g} with confidence "
              f"{1 - significance:g}; the accountant's epsilon {accountant:.3g}")
    return {"empirical_epsilon": audit.epsilon, "epsilon_lower_bound":
            audit.epsilon_lower_bound, "accountant_epsilon": accountant, "delta": delta,
            "rounds": rounds, "audit": audit}
