"""Test helpers: a plain, unvectorized reference of one FedOpt round, and tree assertions.

The reference is written to be obviously right rather than fast: Python loops over clients and
local steps, one `jax.grad` per step, and none of the engine's machinery (no vmap, scan,
while_loop or shard_map). Tests compare the compiled round against it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.algorithms.base import ClientOptimizer, resolve_optimizer
from fedjax_sim.data.cohort import Cohort
from fedjax_sim.models.core import Model


@functools.lru_cache(maxsize=64)
def _local_step(model: Model, optimizer: optax.GradientTransformation, mu: float = 0.0,
                trained: tuple[bool, ...] | None = None):
    """One jitted local step (with FedProx's proximal gradient mu (w - w_t)); `trained` (one
    bool per leaf) zeroes the frozen leaves' gradient. Cached so repeated reference rounds do
    not recompile it."""

    @jax.jit
    def step(params, opt_state, batch, mask, key, anchor):
        def batch_loss(p):
            per_example = model.loss(p, batch, key)
            total = jnp.sum(jnp.where(mask, per_example, 0.0))
            return total / jnp.maximum(jnp.sum(mask), 1), total

        (_, total), grads = jax.value_and_grad(batch_loss, has_aux=True)(params)
        grads = jax.tree.map(lambda g, p, a: g + mu * (p - a), grads, params, anchor)
        if trained is not None:
            leaves, treedef = jax.tree.flatten(grads)
            grads = jax.tree.unflatten(treedef, [g if t else jnp.zeros_like(g)
                                                 for g, t in zip(leaves, trained, strict=True)])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, total

    return step


@functools.lru_cache(maxsize=16)
def _example_grad(model: Model):
    """The loss and gradient of one example (a batch of one), jitted once per model."""
    return jax.jit(lambda p, example, key: jax.value_and_grad(
        lambda p: model.loss(p, example, key)[0])(p))


def _dp_sgd_step(model: Model, optimizer: optax.GradientTransformation, example_dp,
                 mu: float = 0.0):
    """One DP-SGD step (Abadi et al. 2016, Algorithm 1), written out: a loop over the real
    examples, each gradient clipped to C in float64, summed, noised with N(0, (z C)^2) from
    the step key (example i's model key `split(fold_in(key, 0), B)[i]`, the noise
    `fold_in(key, 1)` split per leaf), divided by B, plus the proximal gradient mu (w - w_t);
    then the optimizer's step."""
    grad = _example_grad(model)

    def step(params, opt_state, batch, mask, key, anchor):
        mask = np.asarray(mask)
        size = len(mask)
        keys = jax.random.split(jax.random.fold_in(key, 0), size)
        leaves, treedef = jax.tree.flatten(params)
        total = [np.zeros(x.shape, np.float64) for x in leaves]
        loss_sum = 0.0
        for i in np.flatnonzero(mask):
            loss, g = grad(params, {k: v[i:i + 1] for k, v in batch.items()}, keys[i])
            g = [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]
            norm = np.sqrt(sum(np.sum(x ** 2) for x in g))
            scale = min(1.0, example_dp.clip_norm / norm) if norm > 0 else 1.0
            total = [t + scale * x for t, x in zip(total, g, strict=True)]
            loss_sum += float(loss)
        noise_keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        stddev = example_dp.noise_multiplier * example_dp.clip_norm
        grads = [jnp.asarray((t + stddev * np.asarray(jax.random.normal(k, x.shape, x.dtype),
                                                      np.float64)) / size, x.dtype)
                 for t, k, x in zip(total, noise_keys, leaves, strict=True)]
        grads = jax.tree.map(lambda g, p, a: g + mu * (p - a),
                             jax.tree.unflatten(treedef, grads), params, anchor)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss_sum

    return step


def _all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def reference_round(
    model: Model,
    client_optimizer: ClientOptimizer,
    server_optimizer: optax.GradientTransformation,
    params: Any,
    server_opt_state: Any,
    cohort: Cohort,
    pool: dict[str, np.ndarray],
    key: jax.Array,
    batch_size: int,
    round_num: int = 0,
    client_weighting: str = "num_examples",
    mu: float = 0.0,
    example_dp=None,
    trainable: Any = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """One FedOpt round, one client and one step at a time.

    Args:
      model: the model trained.
      client_optimizer: an optax transformation (or `round -> transformation`).
      server_optimizer: applied to the weighted mean of `server_params - client_params`.
      params: the server params.
      server_opt_state: the server optimizer's state.
      cohort: a host (numpy) cohort; `order` indexes the rows of `pool`.
      pool: the feature arrays the cohort's `order` points into.
      key: the round key.
      batch_size: B, examples per local step (padded entries are masked).
      round_num: the server round, for client optimizers that depend on it.
      client_weighting: "num_examples" or "uniform".
      mu: FedProx's proximal coefficient (0: FedOpt).
      example_dp: an `fs.algorithms.ExampleDP` for DP-SGD's local steps (per-example loop,
        `_dp_sgd_step`), or None.
      trainable: a mask (`fs.filters.mask`) of the leaves trained; the others' gradient is
        zeroed, which keeps them in place for client optimizers that do not move a leaf on a
        zero gradient (SGD, Adam; not a weight decay). None trains every leaf.

    Returns:
      `(new_params, new_server_opt_state, per_client)`. `per_client` holds, in cohort order,
      "delta" (list of pytrees), "opt_state" (list), and numpy arrays "train_loss",
      "num_steps", "finite" and "weight" (the weight actually used: 0 when excluded).
    """
    optimizer = resolve_optimizer(client_optimizer, jnp.int32(round_num))
    if trainable is not None and example_dp is not None:
        raise ValueError("the reference trains part of the model with plain steps only, "
                         "not with example_dp")
    trained = None if trainable is None else tuple(bool(t) for t in jax.tree.leaves(trainable))
    step_fn = (_local_step(model, optimizer, mu, trained) if example_dp is None
               else _dp_sgd_step(model, optimizer, example_dp, mu))
    order = np.asarray(cohort.order)
    last = len(order) - 1
    client_keys_root = jax.random.fold_in(key, 0)  # fold_in(key, 1) is the server's

    deltas, opt_states, losses, finite, weights = [], [], [], [], []
    for c in range(len(cohort.client_ids)):
        start, length = int(cohort.start[c]), int(cohort.length[c])
        num_steps = int(cohort.num_steps[c])
        client_key = jax.random.fold_in(client_keys_root, int(cohort.client_ids[c]))
        train_key = jax.random.fold_in(client_key, 0)

        local, opt_state = params, optimizer.init(params)
        loss_sum, count = 0.0, 0.0
        for s in range(num_steps):
            offset = s * batch_size + np.arange(batch_size)
            rows = order[np.minimum(start + offset, last)]
            batch = {k: jnp.asarray(v[rows]) for k, v in pool.items()}
            mask = jnp.asarray(offset < length)
            local, opt_state, total = step_fn(local, opt_state, batch, mask,
                                              jax.random.fold_in(train_key, s), params)
            loss_sum += float(total)
            count += float(np.sum(offset < length))

        delta = jax.tree.map(jnp.subtract, params, local)
        ok = _all_finite(delta)
        deltas.append(delta)
        opt_states.append(opt_state)
        losses.append(loss_sum / max(count, 1.0))
        finite.append(ok)
        # A non-finite update would poison the mean, so it is left out (weight 0).
        size = float(cohort.num_examples[c]) if client_weighting == "num_examples" else 1.0
        weights.append(size * float(cohort.weights[c]) if ok else 0.0)

    per_client = {
        "delta": deltas,
        "opt_state": opt_states,
        "train_loss": np.array(losses, np.float32),
        "num_steps": np.asarray(cohort.num_steps),
        "finite": np.array(finite),
        "weight": np.array(weights, np.float32),
    }
    total_weight = sum(weights)
    if total_weight == 0:
        return params, server_opt_state, per_client  # nobody to learn from

    aggregate = jax.tree.map(jnp.zeros_like, params)
    for w, d in zip(weights, deltas, strict=True):
        if w > 0:
            aggregate = jax.tree.map(lambda a, x, w=w: a + w * x, aggregate, d)
    aggregate = jax.tree.map(lambda a: a / total_weight, aggregate)
    updates, server_opt_state = server_optimizer.update(aggregate, server_opt_state, params)
    return optax.apply_updates(params, updates), server_opt_state, per_client


def _paired_leaves(actual: Any, expected: Any, prefix: str):
    """Yields (path name, actual leaf, expected leaf) as numpy arrays; structures must match."""
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
    if a_def != e_def:
        raise AssertionError(f"{prefix}tree structures differ:\n  {a_def}\n  {e_def}")
    for (path, a), (_, e) in zip(a_leaves, e_leaves, strict=True):
        yield jax.tree_util.keystr(path) or "<root>", np.asarray(a), np.asarray(e)


def assert_trees_close(actual: Any, expected: Any, rtol: float = 1e-5, atol: float = 1e-6,
                       what: str = "") -> None:
    """Asserts two pytrees have the same structure and leaves equal to tolerance.

    Raises:
      AssertionError: naming the first mismatching leaf path, its max absolute difference and
        where it occurs.
    """
    prefix = f"{what}: " if what else ""
    for name, a, e in _paired_leaves(actual, expected, prefix):
        if a.shape != e.shape:
            raise AssertionError(f"{prefix}leaf {name}: shape {a.shape} != {e.shape}")
        if np.allclose(a, e, rtol=rtol, atol=atol, equal_nan=True):
            continue
        diff = np.abs(a.astype(np.float64) - e.astype(np.float64))
        diff = np.where(np.isnan(diff), np.inf, diff)
        worst = np.unravel_index(np.argmax(diff), diff.shape) if diff.ndim else ()
        raise AssertionError(
            f"{prefix}leaf {name} differs (rtol={rtol}, atol={atol}): max |diff| "
            f"{diff[worst]:.3g} at {tuple(int(i) for i in worst)} (actual {a[worst]!r}, "
            f"expected {e[worst]!r}); {int(np.sum(~np.isclose(a, e, rtol, atol)))} of "
            f"{a.size} entries differ"
        )


def assert_trees_equal(actual: Any, expected: Any, what: str = "") -> None:
    """Asserts two pytrees are bitwise identical (same structure, dtypes and values)."""
    prefix = f"{what}: " if what else ""
    for name, a, e in _paired_leaves(actual, expected, prefix):
        if a.dtype != e.dtype or a.shape != e.shape:
            raise AssertionError(f"{prefix}leaf {name}: {a.dtype}{a.shape} != {e.dtype}{e.shape}")
        if not np.array_equal(a, e, equal_nan=True):
            n = int(np.sum(a != e))
            raise AssertionError(f"{prefix}leaf {name}: {n} of {a.size} entries differ bitwise")


def round_inputs(algorithm, data, indices, *, engine, cohort_size: int | None = None,
                 resident: bool = True, seed: int = 0, round_num: int = 0):
    """A round's device inputs for the clients at `indices` (`rounds.Packer`), with the
    training pass's host cohort and pool, which `reference_round` reads.

    Returns `(inputs, host cohort, host pool)`.
    """
    from fedjax_sim.data.cohort import resident_order
    from fedjax_sim.engine import replicate
    from fedjax_sim.rounds import Packer

    size = len(indices) if cohort_size is None else cohort_size
    packer = Packer(data, algorithm.passes, size, engine,
                    pool=replicate(data.features, engine) if resident else None,
                    label=algorithm.model.label)
    cohorts, rows = packer.pack(np.asarray(indices), seed=seed, round_num=round_num)
    inputs = packer.place(cohorts, rows)
    if resident:
        return inputs, resident_order(cohorts[-1], rows[-1]), dict(data.features)
    return inputs, cohorts[-1], {k: np.asarray(v) for k, v in inputs.pool.items()}


def reference_scaffold_round(model: Model, client_lr: float, server_optimizer, params,
                             server_opt_state, c, client_c: dict, cohort: Cohort,
                             pool: dict[str, np.ndarray], key: jax.Array, batch_size: int,
                             num_clients: int, client_weighting: str = "uniform"):
    """One SCAFFOLD round (Karimireddy et al. 2020, Algorithm 1, option II), one client and
    one step at a time: y <- y - lr (g(y) - c_i + c); c_i+ = c_i - c + (x - y) / (K lr);
    x <- server step on mean(x - y); c <- c + (|S| / N) mean(c_i+ - c_i).

    `client_c` maps client ids to their control variates (absent: zeros) and is not changed;
    returns `(params, server_opt_state, c, new client_c)`.
    """
    order = np.asarray(cohort.order)
    last = len(order) - 1
    zeros = jax.tree.map(jnp.zeros_like, params)
    grad = jax.jit(lambda p, batch, mask, k: jax.grad(
        lambda p: jnp.sum(jnp.where(mask, model.loss(p, batch, k), 0.0))
        / jnp.maximum(jnp.sum(mask), 1))(p))
    new_c, dys, dcs, weights = dict(client_c), [], [], []
    for i in range(len(cohort.client_ids)):
        cid, steps = int(cohort.client_ids[i]), int(cohort.num_steps[i])
        if cohort.weights[i] == 0:
            continue
        ci = client_c.get(cid, zeros)
        train_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 0), cid), 0)
        y = params
        for s in range(steps):
            offset = s * batch_size + np.arange(batch_size)
            rows = order[np.minimum(int(cohort.start[i]) + offset, last)]
            batch = {k: jnp.asarray(v[rows]) for k, v in pool.items()}
            g = grad(y, batch, jnp.asarray(offset < int(cohort.length[i])),
                     jax.random.fold_in(train_key, s))
            y = jax.tree.map(lambda y, g, ci, c: y - client_lr * (g - ci + c), y, g, ci, c)
        dy = jax.tree.map(jnp.subtract, params, y)
        ci_new = jax.tree.map(lambda ci, c, d, k=steps: ci - c + d / (k * client_lr), ci, c, dy)
        new_c[cid] = ci_new
        dys.append(dy)
        dcs.append(jax.tree.map(jnp.subtract, ci_new, ci))
        weights.append(float(cohort.num_examples[i]) if client_weighting == "num_examples"
                       else 1.0)
    total = sum(weights)
    mean = lambda trees: jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs,
                                                                            strict=True)) / total,
                                      *trees)
    dy, dc = mean(dys), mean(dcs)
    updates, server_opt_state = server_optimizer.update(dy, server_opt_state, params)
    c = jax.tree.map(lambda c, d: c + len(dys) / num_clients * d, c, dc)
    return optax.apply_updates(params, updates), server_opt_state, c, new_c


def reference_mime_round(model: Model, optimizer, params, opt_state, grad_cohort: Cohort,
                         train_cohort: Cohort, pool: dict[str, np.ndarray], key: jax.Array,
                         *, svrg: bool, client_weighting: str = "num_examples"):
    """One Mime (`svrg`) or MimeLite round (Karimireddy et al. 2021), one client and one step
    at a time: c = the weighted mean of the clients' full-batch gradients at x; each client
    steps y <- y + U(g, s) with the optimizer state s frozen, g = grad f_i(y) (MimeLite) or
    grad f_i(y) - grad f_i(x) + c (Mime, on the same batch); x <- weighted mean of the y;
    s <- V(s, c). Returns `(params, opt_state)`."""
    def rows(cohort, i, s):
        offset = s * cohort.batch_size + np.arange(cohort.batch_size)
        order = np.asarray(cohort.order)
        idx = order[np.minimum(int(cohort.start[i]) + offset, len(order) - 1)]
        return ({k: jnp.asarray(v[idx]) for k, v in pool.items()},
                jnp.asarray(offset < int(cohort.length[i])))

    grad = jax.jit(lambda p, batch, mask, k: jax.grad(
        lambda p: jnp.sum(jnp.where(mask, model.loss(p, batch, k), 0.0))
        / jnp.maximum(jnp.sum(mask), 1))(p))
    real = [i for i in range(len(train_cohort.client_ids)) if train_cohort.weights[i] > 0]
    weights = [float(train_cohort.num_examples[i]) if client_weighting == "num_examples"
               else 1.0 for i in real]
    mean = lambda trees: jax.tree.map(
        lambda *xs: sum(w * x for w, x in zip(weights, xs, strict=True)) / sum(weights), *trees)
    client_key = lambda pass_key, i: jax.random.fold_in(jax.random.fold_in(
        pass_key, int(train_cohort.client_ids[i])), 0)
    c = mean([grad(params, *rows(grad_cohort, i, 0),
                   jax.random.fold_in(client_key(jax.random.fold_in(key, 0), i), 0))
              for i in real])
    ys = []
    for i in real:
        y, k0 = params, client_key(jax.random.fold_in(key, 2), i)
        for s in range(int(train_cohort.num_steps[i])):
            batch, mask = rows(train_cohort, i, s)
            k = jax.random.fold_in(k0, s)
            g = grad(y, batch, mask, k)
            if svrg:
                g = jax.tree.map(lambda g, gx, c: g - gx + c, g, grad(params, batch, mask, k), c)
            updates, _ = optimizer.update(g, opt_state, y)
            y = optax.apply_updates(y, updates)
        ys.append(y)
    _, opt_state = optimizer.update(c, opt_state, params)
    return mean(ys), opt_state


def reference_feddyn_round(model: Model, client_lr: float, alpha: float, params, h,
                           client_g: dict, cohort: Cohort, pool: dict[str, np.ndarray],
                           key: jax.Array, num_clients: int):
    """One FedDyn round (Acar et al. 2021, Algorithm 1) with client SGD, one client and one
    step at a time: w <- w - lr (grad L_i(w) - g_i + alpha (w - x)); g_i <- g_i - alpha (w - x);
    h <- h - alpha (|P| / N) mean(w - x); x <- mean(w) - h / alpha (uniform means).
    `client_g` maps ids to gradient states (absent: zeros) and is not changed; returns
    `(params, h, new client_g)`."""
    order = np.asarray(cohort.order)
    zeros = jax.tree.map(jnp.zeros_like, params)
    grad = jax.jit(lambda p, batch, mask, k: jax.grad(
        lambda p: jnp.sum(jnp.where(mask, model.loss(p, batch, k), 0.0))
        / jnp.maximum(jnp.sum(mask), 1))(p))
    new_g, ws = dict(client_g), []
    for i in range(len(cohort.client_ids)):
        if cohort.weights[i] == 0:
            continue
        cid = int(cohort.client_ids[i])
        gi = client_g.get(cid, zeros)
        k0 = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 0), cid), 0)
        w = params
        for s in range(int(cohort.num_steps[i])):
            offset = s * cohort.batch_size + np.arange(cohort.batch_size)
            idx = order[np.minimum(int(cohort.start[i]) + offset, len(order) - 1)]
            g = grad(w, {k: jnp.asarray(v[idx]) for k, v in pool.items()},
                     jnp.asarray(offset < int(cohort.length[i])), jax.random.fold_in(k0, s))
            w = jax.tree.map(lambda w, g, gi, x: w - client_lr * (g - gi + alpha * (w - x)),
                             w, g, gi, params)
        new_g[cid] = jax.tree.map(lambda gi, w, x: gi - alpha * (w - x), gi, w, params)
        ws.append(w)
    mean_w = jax.tree.map(lambda *xs: sum(xs) / len(xs), *ws)
    h = jax.tree.map(lambda h, m, x: h - alpha * len(ws) / num_clients * (m - x), h, mean_w,
                     params)
    return jax.tree.map(lambda m, h: m - h / alpha, mean_w, h), h, new_g


def reference_ditto_round(model: Model, client_optimizer, personal_optimizer, lam: float,
                          server_optimizer, params, opt_state, personal: dict, cohort: Cohort,
                          pool: dict[str, np.ndarray], key: jax.Array, batch_size: int,
                          num_clients: int):
    """One Ditto round (Li et al. 2021, Algorithm 1), one client and one step at a time: the
    global model by FedAvg (`reference_round`), and on the same batches each sampled client's
    personal model `v <- v - eta (grad F(v) + lam (v - w))`, v from `personal` (client id ->
    params; the server params for a client seen first). Returns (params, opt_state,
    personal)."""
    new_params, opt_state, _ = reference_round(model, client_optimizer, server_optimizer,
                                               params, opt_state, cohort, pool, key,
                                               batch_size)
    step_fn = _local_step(model, personal_optimizer, lam)
    order = np.asarray(cohort.order)
    last = len(order) - 1
    personal = dict(personal)
    for c in range(len(cohort.client_ids)):
        cid = int(cohort.client_ids[c])
        if cid >= num_clients or float(cohort.weights[c]) == 0:
            continue
        start, length = int(cohort.start[c]), int(cohort.length[c])
        train_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 0), cid), 0)
        v = personal.get(cid, params)
        v_state = personal_optimizer.init(v)
        for s in range(int(cohort.num_steps[c])):
            offset = s * batch_size + np.arange(batch_size)
            batch = {k: jnp.asarray(x[order[np.minimum(start + offset, last)]])
                     for k, x in pool.items()}
            v, v_state, _ = step_fn(v, v_state, batch, jnp.asarray(offset < length),
                                    jax.random.fold_in(train_key, s), params)
        personal[cid] = v
    return new_params, opt_state, personal


def reference_body_head_round(model: Model, optimizer, server_optimizer, params, opt_state,
                              heads: dict, cohort: Cohort, pool: dict[str, np.ndarray],
                              key: jax.Array, batch_size: int, num_clients: int, is_head,
                              head_steps: int | None = None):
    """One FedPer round (`head_steps` None: every step trains the whole model) or FedRep round
    (the first `head_steps` steps train the head alone, the rest the body alone, each part
    with its own optimizer state over its own leaves), one client and step at a time. Each
    client starts from the server's body and its head from `heads` (client id -> head
    leaves; the server's head for a client seen first); the server averages the body
    updates, example-weighted. Returns (params, opt_state, heads)."""
    from fedjax_sim import filters

    is_body = jax.tree.map(lambda m: not m, is_head)
    grad_fn = jax.jit(jax.grad(lambda p, b, m, k: jnp.sum(jnp.where(m, model.loss(p, b, k), 0.0))
                               / jnp.maximum(jnp.sum(m), 1)))  # the masked mean batch loss
    order = np.asarray(cohort.order)
    last = len(order) - 1
    heads, total, weights = dict(heads), None, 0.0
    server_body, server_head = filters.partition(params, is_body)
    for c in range(len(cohort.client_ids)):
        cid = int(cohort.client_ids[c])
        if cid >= num_clients or float(cohort.weights[c]) == 0:
            continue
        head = heads.get(cid, filters.partition(params, is_head)[0])
        body = server_body
        start, length = int(cohort.start[c]), int(cohort.length[c])
        train_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 0), cid), 0)
        whole_state = optimizer.init(filters.combine(body, head))
        head_state, body_state = optimizer.init(head), optimizer.init(body)
        for s in range(int(cohort.num_steps[c])):
            offset = s * batch_size + np.arange(batch_size)
            batch = {k: jnp.asarray(x[order[np.minimum(start + offset, last)]])
                     for k, x in pool.items()}
            current = filters.combine(body, head)
            g = grad_fn(current, batch, jnp.asarray(offset < length),
                        jax.random.fold_in(train_key, s))
            if head_steps is None:
                updates, whole_state = optimizer.update(g, whole_state, current)
                new = optax.apply_updates(current, updates)
                body = filters.partition(new, is_body)[0]
                head = filters.partition(new, is_head)[0]
            elif s < head_steps:
                g_head = filters.partition(g, is_head)[0]
                updates, head_state = optimizer.update(g_head, head_state, head)
                head = optax.apply_updates(head, updates)
            else:
                g_body = filters.partition(g, is_body)[0]
                updates, body_state = optimizer.update(g_body, body_state, body)
                body = optax.apply_updates(body, updates)
        heads[cid] = head
        w = float(cohort.num_examples[c])
        part = jax.tree.map(lambda s, b, w=w: w * (s - b), server_body, body)
        total = part if total is None else jax.tree.map(jnp.add, total, part)
        weights += w
    if not weights:
        return params, opt_state, heads
    mean = filters.combine(jax.tree.map(lambda a: a / weights, total),
                           jax.tree.map(jnp.zeros_like, server_head))
    updates, opt_state = server_optimizer.update(mean, opt_state, params)
    updates = jax.tree.map(lambda m, u: u if m else jnp.zeros_like(u), is_body, updates)
    return optax.apply_updates(params, updates), opt_state, heads

def _batches(cohort: Cohort, pool: dict[str, np.ndarray], c: int, batch_size: int):
    """Client c's (step, batch, mask) in order, as the engine walks `order`."""
    order = np.asarray(cohort.order)
    start, length = int(cohort.start[c]), int(cohort.length[c])
    for s in range(int(cohort.num_steps[c])):
        offset = s * batch_size + np.arange(batch_size)
        rows = order[np.minimum(start + offset, len(order) - 1)]
        yield s, {k: jnp.asarray(v[rows]) for k, v in pool.items()}, jnp.asarray(offset < length)


@functools.lru_cache(maxsize=16)
def _mean_loss_grad(model: Model):
    """The gradient of the masked mean batch loss, jitted once per model."""
    return jax.jit(lambda p, batch, mask, k: jax.grad(
        lambda p: jnp.sum(jnp.where(mask, model.loss(p, batch, k), 0.0))
        / jnp.maximum(jnp.sum(mask), 1))(p))


def reference_apfl_round(model: Model, client_optimizer, personal_optimizer, alpha: float,
                         alpha_lr: float, server_optimizer, params, opt_state, personal: dict,
                         cohort: Cohort, pool: dict[str, np.ndarray], key: jax.Array,
                         batch_size: int, num_clients: int, client_weighting: str = "uniform"):
    """One APFL round (Deng et al. 2020, Algorithm 1), one client and one step at a time: the
    global model by FedAvg (`reference_round`); on the same batches each sampled client, with
    w its global copy before the step and v_bar = a v + (1 - a) w, g = grad F(v_bar):
    v <- v - eta a g (the personal optimizer's step on a g), a <- clip(a - alpha_lr <v - w, g>,
    0, 1) (alpha_lr = 0: a fixed), w <- w - eta grad F(w). `personal` maps client ids to
    (v, a) (absent: the server params and `alpha`). Returns (params, opt_state, personal)."""
    new_params, opt_state, _ = reference_round(model, client_optimizer, server_optimizer,
                                               params, opt_state, cohort, pool, key,
                                               batch_size, client_weighting=client_weighting)
    w_step, grad = _local_step(model, client_optimizer), _mean_loss_grad(model)
    personal = dict(personal)
    for c in range(len(cohort.client_ids)):
        cid = int(cohort.client_ids[c])
        if cid >= num_clients or float(cohort.weights[c]) == 0:
            continue
        train_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 0), cid), 0)
        v, a = personal.get(cid, (params, alpha))
        w, w_state, v_state = params, client_optimizer.init(params), personal_optimizer.init(v)
        for s, batch, mask in _batches(cohort, pool, c, batch_size):
            k = jax.random.fold_in(train_key, s)
            g = grad(jax.tree.map(lambda v, w, a=a: a * v + (1 - a) * w, v, w), batch, mask, k)
            inner = sum(float(jnp.vdot(vi - wi, gi)) for vi, wi, gi in zip(
                jax.tree.leaves(v), jax.tree.leaves(w), jax.tree.leaves(g), strict=True))
            updates, v_state = personal_optimizer.update(jax.tree.map(lambda g, a=a: a * g, g),
                                                         v_state, v)
            v = optax.apply_updates(v, updates)
            a = min(max(a - alpha_lr * inner, 0.0), 1.0)
            w, w_state, _ = w_step(w, w_state, batch, mask, k, params)
        personal[cid] = (v, a)
    return new_params, opt_state, personal


def reference_pfedme_round(model: Model, lam: float, inner_steps: int, personal_lr: float,
                           eta: float, server_optimizer, params, opt_state, personal: dict,
                           cohort: Cohort, pool: dict[str, np.ndarray], key: jax.Array,
                           batch_size: int, num_clients: int,
                           client_weighting: str = "uniform"):
    """One pFedMe round (Dinh et al. 2020, Algorithm 1), one client, step and inner step at a
    time: theta from the server params, then per batch K inner steps theta <- theta -
    personal_lr (grad F(theta) + lam (theta - w)) and w <- w - eta lam (w - theta); the
    server optimizer on the weighted mean of the clients' w deltas. `personal` maps client
    ids to theta and is not changed; returns (params, opt_state, new personal)."""
    grad = _mean_loss_grad(model)
    personal, deltas, weights = dict(personal), [], []
    for c in range(len(cohort.client_ids)):
        cid = int(cohort.client_ids[c])
        if cid >= num_clients or float(cohort.weights[c]) == 0:
            continue
        train_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 0), cid), 0)
        w = theta = params
        for s, batch, mask in _batches(cohort, pool, c, batch_size):
            for _ in range(inner_steps):
                g = grad(theta, batch, mask, jax.random.fold_in(train_key, s))
                theta = jax.tree.map(lambda t, g, x: t - personal_lr * (g + lam * (t - x)),
                                     theta, g, w)
            w = jax.tree.map(lambda x, t: x - eta * lam * (x - t), w, theta)
        personal[cid] = theta
        deltas.append(jax.tree.map(jnp.subtract, params, w))
        weights.append(float(cohort.num_examples[c]) if client_weighting == "num_examples"
                       else 1.0)
    mean = jax.tree.map(lambda *xs: sum(q * x for q, x in zip(weights, xs, strict=True))
                        / sum(weights), *deltas)
    updates, opt_state = server_optimizer.update(mean, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, personal


def check_rounds_against_reference(algorithm, data, params, engine, reference, initial, *,
                                   rounds: int = 3, cohort_size: int = 5,
                                   key: jax.Array | None = None, rtol: float = 1e-5,
                                   atol: float = 1e-6):
    """Runs `rounds` vectorized rounds of a stateful `algorithm` on random cohorts of `data`
    beside `reference(ref, host_cohort, host_pool, round_key) -> ref` (a plain loop whose
    `ref[0]` is the server params and `ref[-1]` the client rows by population id), from
    `initial` = the reference's first `ref`, and asserts equal params after every round and,
    at the end, that each client the reference holds a row for has that row in the client
    store while every other row was never written. Returns (state, store, ref)."""
    from fedjax_sim import client_store
    from fedjax_sim.engine import Engine, replicate
    from fedjax_sim.rounds import RoundRunner, new_store

    key = jax.random.key(3) if key is None else key
    state = replicate(algorithm.init(params, key), engine)
    store = new_store(algorithm, data, params, engine)
    runner = RoundRunner(algorithm, data, cohort_size, engine, seed=0,
                         pool=replicate(data.features, engine))
    ref, rng = initial, np.random.default_rng(1)
    for r in range(rounds):
        indices = rng.choice(data.num_clients, cohort_size, replace=False)
        cohorts, rows = runner.packer.pack(indices, seed=0, round_num=r)
        state, store, _ = runner(state, store, runner.packer.place(cohorts, rows))
        _, cohort, pool = round_inputs(algorithm, data, indices, engine=Engine(), seed=0,
                                       round_num=r)
        ref = reference(ref, cohort, pool, jax.random.fold_in(key, r))
        assert_trees_close(state.params, ref[0], rtol, atol, what=f"round {r} params")
    sentinel = jax.tree.map(lambda x: jnp.full_like(x, 99), algorithm.client_state(params))
    table = client_store.gather(store, jnp.arange(data.num_clients), sentinel)
    for cid in range(data.num_clients):
        mine = jax.tree.map(lambda t, cid=cid: t[cid], table)
        if cid in ref[-1]:
            assert_trees_close(mine, ref[-1][cid], rtol, atol, what=f"client {cid}'s row")
        else:
            assert all(np.all(np.asarray(x) == 99) for x in jax.tree.leaves(mine)), \
                f"client {cid} was never sampled but its row was written"
    return state, store, ref


def reference_clustered_round(model: Model, client_optimizer, server_optimizer, params: list,
                              opt_states: list, loss_cohort: Cohort, cohort: Cohort,
                              pool: dict[str, np.ndarray], key: jax.Array, batch_size: int,
                              client_weighting: str, round_num: int = 0):
    """One HypCluster ("num_examples") or IFCA ("uniform") round, one client and one step at a
    time: each client's mean loss under each of the k models `params` over its examples (the
    batches of `loss_cohort`, step keys from `fold_in(key, 2)`), its cluster the argmin (a
    loss that is not finite counting as infinite); then each cluster is one FedOpt round
    (`reference_round`) of the clients that chose it, the others weighted 0 (so a cluster
    nobody chose keeps its model and state). `opt_states` are the k server optimizer states.
    Returns (params, opt_states, {client id: cluster})."""
    loss = jax.jit(model.loss)
    order = np.asarray(loss_cohort.order)
    last, b = len(order) - 1, loss_cohort.batch_size
    chosen = {}
    for c in range(len(loss_cohort.client_ids)):
        cid, start = int(loss_cohort.client_ids[c]), int(loss_cohort.start[c])
        keys = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 2), cid), 0)
        sums, count = np.zeros(len(params)), 0
        for s in range(int(loss_cohort.num_steps[c])):
            offset = s * b + np.arange(b)
            batch = {k: jnp.asarray(v[order[np.minimum(start + offset, last)]])
                     for k, v in pool.items()}
            mask = offset < int(loss_cohort.length[c])
            for j, p in enumerate(params):
                sums[j] += float(np.sum(np.where(mask, loss(p, batch,
                                                            jax.random.fold_in(keys, s)), 0)))
            count += int(mask.sum())
        mean = sums / max(count, 1)
        chosen[cid] = int(np.argmin(np.where(np.isfinite(mean), mean, np.inf)))
    new_params, new_states = [], []
    for j, (p, o) in enumerate(zip(params, opt_states, strict=True)):
        mine = np.array([chosen.get(int(cid)) == j for cid in cohort.client_ids])
        part = dataclasses.replace(cohort, weights=np.where(mine, cohort.weights, 0.0)
                                   .astype(np.float32))
        p, o, _ = reference_round(model, client_optimizer, server_optimizer, p, o, part, pool,
                                  key, batch_size, round_num, client_weighting)
        new_params.append(p)
        new_states.append(o)
    return new_params, new_states, chosen


def check_personal_evaluation(algorithm, result, train, test) -> dict:
    """Asserts that a run's last "eval_personal" holds, for each evaluated client, the
    accuracy of `algorithm.personal(params, its store row)` on its own test split, each
    evaluated alone by `fs.evaluate`. Returns the last record."""
    from fedjax_sim import client_store
    from fedjax_sim.data.federated import from_client_dict
    from fedjax_sim.evaluation import evaluate

    last = result.history[-1]
    rows = client_store.gather(result.store, jnp.arange(train.num_clients),
                               algorithm.client_state(result.params))
    got = last["eval_personal_clients"]
    for i, cid in enumerate(got["client_id"]):
        j = int(train.index_of([cid])[0])
        own = algorithm.personal(result.params, jax.tree.map(lambda t, j=j: t[j], rows))
        one = from_client_dict({cid: test.client(int(test.index_of([cid])[0]))})
        expected = evaluate(algorithm.model, own, one).clients["accuracy"][0]
        np.testing.assert_allclose(got["accuracy"][i], expected, rtol=1e-6,
                                   err_msg=f"client {cid}")
    return last


def fedavg_client_models(model: Model, data, params, client_optimizer, batch_size: int,
                         key: jax.Array | None = None) -> dict:
    """Each client's params after one FedAvg round's local training from `params` with the
    whole population as the cohort (`reference_round`, seed 0, round 0): client id ->
    params. The limit a personal model reaches when nothing pulls it to the global one."""
    from fedjax_sim.algorithms.fedavg import fedavg
    from fedjax_sim.engine import Engine

    algorithm = fedavg(model, client_optimizer, batch_size=batch_size)
    _, cohort, pool = round_inputs(algorithm, data, np.arange(data.num_clients),
                                   engine=Engine(), seed=0)
    server = optax.sgd(1.0)
    key = jax.random.fold_in(jax.random.key(0), 0) if key is None else key
    _, _, per = reference_round(model, client_optimizer, server, params, server.init(params),
                                cohort, pool, key, batch_size)
    ids = np.asarray(cohort.client_ids)[:data.num_clients]
    return {int(cid): jax.tree.map(jnp.subtract, params, per["delta"][c])
            for c, cid in enumerate(ids)}
