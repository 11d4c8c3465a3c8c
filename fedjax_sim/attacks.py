"""Malicious clients: who they are, what they do to their data or their updates, and how well
it works.

- `Adversary`: a fixed, seeded set of malicious clients in the population (Byzantine
  identities persist from round to round, and poisoned data stays poisoned), and `sampler`,
  which puts exactly m of them in every round's cohort.
- Data attacks (`label_flip`, `backdoor`) rewrite the malicious clients' examples before the
  run (`poison`), so every algorithm and engine path trains on them unchanged; each knows the
  test set whose accuracy is its success rate (`DataAttack.success_data`).
- Update attacks are aggregation-chain stages (`sign_flip`, `scaling`, `gaussian`) that
  rewrite a malicious client's output; put them first, before `mask_nonfinite`, so the
  server's mask, norms and health monitor see what the attacker sent:
  `chain(sign_flip(adv), mask_nonfinite(), weight_by("uniform"), median())`.
- `alie` ("a little is enough") needs the benign clients' statistics, so it wraps the
  chain's reduction: a rows reduction that crafts the malicious rows, then hands all rows to
  the wrapped rule (`fs.robust`'s, or sums them for a streamed one such as the mean).
- `success(model, params, attack, test)`: the attack success rate of a model; in a run,
  `Simulation(eval_extra={"attack_success": attack.success_data(test)})` records it at every
  evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import aggregators as agg
from fedjax_sim.checks import check_integer, check_number
from fedjax_sim.data.federated import FederatedData, rows_of
from fedjax_sim.evaluation import evaluate_pooled
from fedjax_sim.sampling import Sampler


@dataclasses.dataclass(frozen=True)
class Adversary:
    """The malicious clients of a population.

    Attributes:
      malicious: int64[m], their population positions, sorted.
      num_clients: the population size N.
    """

    malicious: np.ndarray
    num_clients: int

    def __post_init__(self):
        ids = np.unique(np.asarray(self.malicious, np.int64))
        if ids.size and (ids[0] < 0 or ids[-1] >= self.num_clients):
            raise ValueError(f"malicious client positions must be in [0, {self.num_clients}), "
                             f"got {ids[0]}..{ids[-1]}")
        object.__setattr__(self, "malicious", ids)

    @classmethod
    def choose(cls, num_clients: int, fraction: float, seed: int = 0) -> Adversary:
        """`round(fraction * num_clients)` clients drawn uniformly, seeded."""
        num_clients = check_integer("num_clients", num_clients, 1)
        fraction = check_number("fraction", fraction, at_least=0, at_most=1)
        m = round(fraction * num_clients)
        picked = np.random.default_rng([seed, 0xBAD]).choice(num_clients, m, replace=False)
        return cls(picked, num_clients)

    @property
    def mask(self) -> np.ndarray:
        """bool[N]: True for a malicious client."""
        out = np.zeros(self.num_clients, bool)
        out[self.malicious] = True
        return out

    def sampler(self, cohort_size: int, num_malicious: int | None = None) -> Sampler:
        """Uniform cohorts of `cohort_size` holding exactly `num_malicious` malicious clients
        each round (default: the population's malicious share of the cohort, rounded), drawn
        from the malicious set, the rest from the benign, seeded by (seed, round); the
        cohort is shuffled, so the malicious are not all at its front."""
        cohort_size = check_integer("cohort_size", cohort_size, 1)
        if num_malicious is None:
            num_malicious = round(len(self.malicious) / self.num_clients * cohort_size)
        m = check_integer("num_malicious", num_malicious, 0)
        benign = np.flatnonzero(~self.mask)
        if m > cohort_size:
            raise ValueError(f"num_malicious {m} is more than the cohort of {cohort_size}")
        if m > len(self.malicious):
            raise ValueError(f"num_malicious {m} is more than the adversary's "
                             f"{len(self.malicious)} malicious clients")
        if cohort_size - m > len(benign):
            raise ValueError(f"a cohort of {cohort_size} with {m} malicious needs "
                             f"{cohort_size - m} benign clients; the population has "
                             f"{len(benign)}")

        def sample(seed, round_num):
            rng = np.random.default_rng([seed, round_num, 0xBAD])
            picked = np.concatenate([rng.choice(self.malicious, m, replace=False),
                                     rng.choice(benign, cohort_size - m, replace=False)])
            return rng.permutation(picked)

        return Sampler(sample, cohort_size, f"adversarial({cohort_size}, {m} malicious)")


# -- data attacks ----------------------------------------------------------------------------
class DataAttack(NamedTuple):
    """A rewrite of examples: `apply(features, rng) -> features` on a malicious client's
    examples; `success_data(test)` is the test set on which the model's accuracy is the
    attack's success rate (the triggered or flipped examples, relabelled to what the attacker
    wants)."""

    name: str
    apply: Callable[[dict, np.random.Generator], dict]
    success_data: Callable[[FederatedData], FederatedData]


def poison(train: FederatedData, adversary: Adversary, attack: DataAttack, *,
           seed: int = 0) -> FederatedData:
    """`train` with every malicious client's examples rewritten by `attack` (a new
    population; the benign clients' examples are the same arrays' rows)."""
    if adversary.num_clients != train.num_clients:
        raise ValueError(f"the adversary is for {adversary.num_clients} clients, the data has "
                         f"{train.num_clients}")
    features = {k: np.array(v) for k, v in train.features.items()}
    rows = rows_of(train.offsets, adversary.malicious)
    if len(rows):
        part = attack.apply({k: v[rows] for k, v in features.items()},
                            np.random.default_rng([seed, 0xD47A]))
        for k, v in part.items():
            features[k][rows] = v
    return FederatedData(train.client_ids, features, train.offsets)


def label_flip(num_classes: int, *, source: int | None = None, target: int | None = None,
               label: str = "y") -> DataAttack:
    """Label flipping (Biggio et al. 2012; Tolpegin et al. 2020): with `source` and `target`,
    the malicious clients' examples of class `source` are labelled `target`; without, every
    label l becomes `num_classes - 1 - l`. Success: the share of the test examples concerned
    (class `source`, or all) that the model puts in the flipped class."""
    num_classes = check_integer("num_classes", num_classes, 2)
    if (source is None) != (target is None):
        raise ValueError("label_flip takes both source and target, or neither")
    if source is not None:
        for name, c in (("source", source), ("target", target)):
            check_integer(name, c, 0, num_classes - 1)

    def flip(y):
        if source is None:
            return (num_classes - 1 - y).astype(y.dtype)
        return np.where(y == source, target, y).astype(y.dtype)

    def apply(features, rng):
        return {**features, label: flip(features[label])}

    def success_data(test):
        keep = (np.ones(test.total_examples, bool) if source is None
                else test.features[label] == source)
        return _relabelled(test, keep, lambda f: {**f, label: flip(f[label])})

    name = "label_flip" if source is None else f"label_flip({source}->{target})"
    return DataAttack(name, apply, success_data)


def backdoor(target: int, num_classes: int, *, image_shape: tuple[int, ...] = (28, 28),
             size: int = 4, value: float = 1.0, fraction: float = 0.5, feature: str = "x",
             label: str = "y") -> DataAttack:
    """A pixel-pattern backdoor (Gu et al. 2017; Bagdasaryan et al. 2020; Sun et al. 2019 on
    EMNIST): a `size` x `size` square of `value` in the bottom-right corner of each image, on
    a `fraction` of every malicious client's examples (seeded), relabelled `target`. Images
    may be stored flat (`[n, prod(image_shape)]`) or shaped. Success: the share of triggered
    test examples of another class that the model classifies as `target`. `value` 1.0 is
    white ink on `fs.data.femnist`'s default (normalized: background 0) images."""
    num_classes = check_integer("num_classes", num_classes, 2)
    target = check_integer("target", target, 0, num_classes - 1)
    size = check_integer("size", size, 1)
    fraction = check_number("fraction", fraction, above=0, at_most=1)
    value = check_number("value", value)
    image_shape = tuple(image_shape)
    if len(image_shape) < 2 or size > min(image_shape[:2]):
        raise ValueError(f"backdoor: a {size}x{size} pattern does not fit images of shape "
                         f"{image_shape}")

    def stamp(x):
        if x.shape[1:] != image_shape and int(np.prod(x.shape[1:])) != int(np.prod(image_shape)):
            raise ValueError(f"backdoor: feature {feature!r} has examples of shape "
                             f"{x.shape[1:]}, not images of shape {image_shape}")
        img = x.reshape((len(x),) + image_shape).copy()
        img[:, -size:, -size:] = value
        return img.reshape(x.shape)

    def apply(features, rng):
        x, y = features[feature], features[label]
        hit = rng.random(len(y)) < fraction
        x, y = x.copy(), y.copy()
        x[hit] = stamp(x[hit])
        y[hit] = target
        return {**features, feature: x, label: y}

    def success_data(test):
        keep = test.features[label] != target
        return _relabelled(test, keep, lambda f: {**f, feature: stamp(f[feature]),
                                                  label: np.full_like(f[label], target)})

    return DataAttack(f"backdoor(target {target})", apply, success_data)


def _relabelled(test: FederatedData, keep: np.ndarray, rewrite) -> FederatedData:
    """The examples `keep` of `test`, rewritten, each client with at least one kept."""
    owner = np.repeat(np.arange(test.num_clients), test.num_examples)
    counts = np.bincount(owner[keep], minlength=test.num_clients)
    if not counts.any():
        raise ValueError("the test set has no example the attack concerns")
    features = rewrite({k: np.asarray(v)[keep] for k, v in test.features.items()})
    has = counts > 0
    return FederatedData(test.client_ids[has], features,
                         np.concatenate([[0], np.cumsum(counts[has])]))


def success(model, params, attack: DataAttack, test: FederatedData, *,
            batch_size: int = 1024) -> float:
    """The attack success rate of `params`: its accuracy, pooled over examples, on
    `attack.success_data(test)` (for a backdoor, the share of triggered images of another
    class put in the target class; for label flipping, the share of the concerned test
    examples put in their flipped class). In a run, `Simulation(eval_extra={"attack_success":
    attack.success_data(test)})` records the same at every evaluation."""
    return evaluate_pooled(model, params, attack.success_data(test),
                           batch_size=batch_size)["accuracy"]


# -- update attacks --------------------------------------------------------------------------
def _update_attack(name: str, adversary: Adversary, rewrite) -> agg.Aggregator:
    table = adversary.mask

    def client(output, weight, ctx, state):
        bad = jnp.asarray(table)[ctx.id] if table.size else jnp.bool_(False)
        bad = jnp.where(ctx.id < table.size, bad, False)
        attacked = rewrite(output, ctx)
        output = jax.tree.map(lambda a, o: jnp.where(bad, a.astype(o.dtype), o), attacked,
                              output)
        return output, weight, {"malicious": bad}

    return agg.stage(f"attack_{name}", client=client)


def sign_flip(adversary: Adversary, scale: float = 1.0) -> agg.Aggregator:
    """Each malicious client sends `-scale` times its honest update (Damaskinos et al. 2018;
    Fang et al. 2020's untargeted baseline)."""
    scale = check_number("scale", scale, above=0)
    return _update_attack("sign_flip", adversary,
                          lambda out, ctx: jax.tree.map(lambda o: -scale * o, out))


def scaling(adversary: Adversary, factor: float) -> agg.Aggregator:
    """Model replacement (Bagdasaryan et al. 2020): each malicious client boosts its update
    by `factor` (their gamma = n / eta: the cohort size over the server learning rate
    replaces the global model with the attacker's in one round under the mean). With a
    data attack (`backdoor`) on the same clients it is the boosted backdoor."""
    factor = check_number("factor", factor, above=0)
    return _update_attack("scaling", adversary,
                          lambda out, ctx: jax.tree.map(lambda o: factor * o, out))


def gaussian(adversary: Adversary, stddev: float) -> agg.Aggregator:
    """Each malicious client sends N(0, stddev^2) noise in place of its update (the Gaussian
    attack of Fang et al. 2020 and Blanchard et al. 2017), drawn from its own key."""
    stddev = check_number("stddev", stddev, at_least=0)
    return _update_attack("gaussian", adversary,
                          lambda out, ctx: agg.gaussian_noise(
                              jax.random.fold_in(ctx.key, 0xBAD), out, stddev))


def alie(adversary: Adversary, reduction: agg.Aggregator, z: float | None = None
         ) -> agg.Aggregator:
    """"A little is enough" (Baruch et al. 2019) against the reduction `reduction` (mean,
    median, trimmed mean, Krum, ...): every malicious client sends `mu - z sigma`, the
    benign clients' per-coordinate mean and standard deviation (over the benign rows, 1/n;
    the paper's attacker knows them, as here, or its colluders estimate them from their own
    honest updates), small enough to pass for benign. `z` defaults to the paper's z_max =
    Phi^-1((n - s) / n) with s = floor(n / 2 + 1) - m, for the round's n counted clients of
    which m are malicious.

    A rows reduction: the crafted rows replace the malicious ones after the chain's
    per-client stages, so a per-client defence before it (a norm bound) bounds the benign
    rows the statistics come from but is not applied again to the crafted row.
    """
    if not isinstance(reduction, agg.Aggregator) or reduction.reduction is None:
        raise TypeError("alie wraps the chain's reduction stage (e.g. fs.aggregators.mean() "
                        f"or median()), got {reduction!r}"[:300])
    if reduction.name == "chain":
        raise TypeError("alie wraps one reduction stage, not a chain: "
                        "chain(weight_by('uniform'), alie(adversary, median()))")
    if z is not None:
        z = check_number("z", z)
    table = adversary.mask

    def client(output, weight, ctx, state):
        output, weight, metrics = reduction.client(output, weight, ctx, state)
        bad = jnp.asarray(table)[ctx.id] if table.size else jnp.bool_(False)
        bad = jnp.where(ctx.id < table.size, bad, False)
        return (output, bad), weight, {**metrics, "malicious": bad}

    def server(reduced, state, key):
        rows, bad = reduced.output
        counted = reduced.weight > 0
        benign, crafted = counted & ~bad, counted & bad
        n = jnp.sum(counted).astype(jnp.float32)
        m = jnp.sum(crafted).astype(jnp.float32)
        if z is None:
            s = jnp.floor(n / 2 + 1) - m
            zz = jax.scipy.special.ndtri(jnp.clip((n - s) / jnp.maximum(n, 1.0), 1e-6,
                                                  1 - 1e-6))
        else:
            zz = jnp.float32(z)
        nb = jnp.maximum(jnp.sum(benign), 1).astype(jnp.float32)

        def craft(x):
            x = x.astype(agg._accumulator(x.dtype))
            w = benign.reshape((-1,) + (1,) * (x.ndim - 1))
            mu = jnp.sum(jnp.where(w, x, 0.0), 0) / nb
            sigma = jnp.sqrt(jnp.sum(jnp.where(w, jnp.square(x - mu), 0.0), 0) / nb)
            return jnp.where(crafted.reshape(w.shape), mu - zz * sigma, x)

        rows = jax.tree.map(craft, rows)
        if reduction.reduction == "rows":
            inner = agg.Reduced(rows, reduced.weight)
        else:
            inner = agg.Reduced(jax.tree.map(lambda x: agg.weighted_sum_rows(reduced.weight, x),
                                             rows), jnp.sum(reduced.weight))
        value, state, metrics = reduction.server(inner, state, key)
        return value, state, {**metrics, "alie_z": zz}

    return agg.stage(f"alie({reduction.name})", client=client, server=server,
                     init=reduction.init, reduction="rows", privacy=reduction.privacy,
                     check=reduction.check)
