"""Checks of what a user passes in, run before anything compiles.

Each names the argument, the client or the feature at fault and says what to do instead: a
mistake caught here costs a user a line of reading, where the same mistake caught by numpy,
Flax or XLA costs an afternoon.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.data.federated import FederatedData, check_labels

# A unit gradient turned into a step larger than this is almost surely a typo'd learning rate.
HUGE_STEP = 1e4


def check_integer(name: str, value: Any, minimum: int | None = None,
                  maximum: int | None = None) -> int:
    """`value` as an int; TypeError unless it is an integer (not a bool, not 2.0), ValueError
    outside [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_number(name: str, value: Any, *, above: float | None = None,
                 at_least: float | None = None, at_most: float | None = None) -> float:
    """`value` as a finite float; ValueError naming `name` unless it is a real number (not a
    bool) that is finite, > `above`, >= `at_least` and <= `at_most` where given."""
    ok = (not isinstance(value, bool) and isinstance(value, int | float | np.number)
          and math.isfinite(value) and (above is None or value > above)
          and (at_least is None or value >= at_least)
          and (at_most is None or value <= at_most))
    if not ok:
        bound = (f" > {above:g}" if above is not None else
                 f" >= {at_least:g}" if at_least is not None else "")
        if at_most is not None:
            bound += f"{' and' if bound else ''} <= {at_most:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """`value` as a bool; TypeError for anything else ("False" is a truthy string)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_mesh(mesh: Any) -> None:
    """Raises unless `mesh` is None or a `jax.sharding.Mesh` with a "clients" axis."""
    if mesh is None:
        return
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh with a 'clients' axis, e.g. "
                        f"fs.client_mesh() (over all devices), got {type(mesh).__name__}")
    if "clients" not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names} but no 'clients' axis to split the "
                         "cohort over: build it with fs.client_mesh(devices)")


def check_data(name: str, value: Any) -> FederatedData:
    """Raises TypeError unless `value` is a `FederatedData`, saying how to build one."""
    if isinstance(value, FederatedData):
        return value
    hint = ""
    if isinstance(value, dict):
        hint = (": for {client id: {feature: array}} use fs.data.from_client_dict(...), for "
                "flat arrays plus a client id per example fs.data.from_arrays(ids, features)")
    elif isinstance(value, tuple) and len(value) == 2:
        hint = ": did you pass the (train, test) pair? Unpack it: train, test = ..."
    raise TypeError(f"{name} must be a fs.data.FederatedData, got {type(value).__name__}{hint}")


def check_not_empty(data: FederatedData, name: str) -> FederatedData:
    if data.num_clients == 0:
        raise ValueError(f"{name} has no clients (a split that left every client without a "
                         "test example gives none, for instance)")
    return data


def check_eval_clients(value: Any, data: FederatedData, name: str) -> int:
    """The number of evaluation clients, at most the population's."""
    check_integer(name, value, 1)
    if value > data.num_clients:
        raise ValueError(f"{name} {value} is larger than the evaluation population of "
                         f"{data.num_clients} clients; pass None to evaluate all of them")
    return int(value)


def check_model(value: Any, name: str = "model"):
    """Raises TypeError unless `value` is a `fs.models.Model`, naming the adapter that makes
    one from what was passed."""
    from fedjax_sim.models.core import Model  # models import these checks

    if isinstance(value, Model):
        return value
    from flax import linen as nn
    from flax import nnx

    if isinstance(value, nn.Module):
        hint = (f"a flax.linen.Module ({type(value).__name__}): wrap it with "
                "fs.models.from_linen(module, input_shape, num_classes)")
    elif isinstance(value, nnx.Module):
        hint = (f"a flax.nnx.Module ({type(value).__name__}): wrap it with "
                "fs.models.from_nnx(module, num_classes)")
    elif callable(value):
        hint = (f"a function ({getattr(value, '__name__', type(value).__name__)}): wrap "
                "init(key) -> params and apply(params, x) -> logits with "
                "fs.models.from_function(init, apply, num_classes)")
    else:
        hint = f"{type(value).__name__} {value!r}"[:200]
    raise TypeError(f"{name} must be a fs.models.Model, got {hint}")


def _factory_name(value: Any) -> str | None:
    """"optax.sgd" when `value` is a public optimizer factory itself (passed uncalled)."""
    import fedjax_sim.algorithms as algorithms

    name = getattr(value, "__name__", None)
    for prefix, module in (("optax", optax), ("fs.algorithms", algorithms)):
        if name and getattr(module, name, None) is value:
            return f"{prefix}.{name}"
    return None


def check_optimizer(value: Any, name: str, *, allow_schedule: bool = False):
    """Checks an optax transformation (or, with `allow_schedule`, a function of the round
    that builds one) and returns it.

    One update of a unit gradient must be finite and point against the gradient (a negative
    learning rate climbs the loss); a step of 0 (a zero learning rate) or over `HUGE_STEP` is
    warned about.
    """
    if not isinstance(value, optax.GradientTransformation):
        kind = "an optax.GradientTransformation (e.g. optax.sgd(0.01))"
        if allow_schedule:
            kind += " or a function of the round number that returns one"
        factory = _factory_name(value)
        if factory:
            raise TypeError(f"{name} must be {kind}; got the function {factory} itself: call "
                            f"it, e.g. {factory}(0.01)")
        if not (allow_schedule and callable(value)):
            raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}"[:300])
        built = value(jnp.int32(0))
        if not isinstance(built, optax.GradientTransformation):
            if np.ndim(built) == 0 and np.issubdtype(np.asarray(built).dtype, np.number):
                raise TypeError(f"{name} is a learning-rate schedule (it returned "
                                f"{float(built):g} for round 0), not an optimizer: pass "
                                "optax.sgd(schedule) for a schedule over local steps, or "
                                "lambda r: optax.sgd(schedule(r)) for one over rounds")
            raise TypeError(f"{name}(round) must return an optax.GradientTransformation, got "
                            f"{type(built).__name__}")
        _check_unit_step(built, name)
        return value
    _check_unit_step(value, name)
    return value


def _check_unit_step(opt: optax.GradientTransformation, name: str) -> None:
    params = jnp.ones((), jnp.float32)
    try:
        updates, _ = opt.update(jnp.ones((), jnp.float32), opt.init(params), params)
    except TypeError as e:
        if "keyword" not in str(e):
            raise
        raise TypeError(f"{name} needs extra arguments in its update ({e}); the engine calls "
                        "update(grads, state, params) only, so line searches (optax.lbfgs) and "
                        "reduce_on_plateau are not supported") from None
    step = float(updates)
    if not math.isfinite(step):
        raise ValueError(f"{name} gives a non-finite update ({step}) for a unit gradient: is "
                         "its learning rate finite?")
    if step > 0:
        raise ValueError(f"{name} moves along the gradient, not against it (update {step:+g} "
                         "for a unit gradient): is its learning rate negative?")
    if -step > HUGE_STEP:
        warnings.warn(f"{name} takes a step of {-step:g} for a unit gradient: is its learning "
                      "rate that large on purpose?", stacklevel=3)
    if step == 0:
        warnings.warn(f"{name} does not move for a unit gradient (update 0): is its learning "
                      "rate 0 (or a schedule starting at 0)?", stacklevel=3)


def _path(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/") or "(root)"


def check_params(model, params: Any, name: str = "params") -> None:
    """Raises unless `params` has the leaves and shapes `model.init` gives, and finite values.

    Params of another shape fail deep inside the model (or, for a classifier with too few
    outputs, silently give NaN losses), so they are compared with the model's own init first.
    """
    if params is None:
        raise ValueError(f"{name} is None: pass the model's params, e.g. result.params or "
                         "model.init(jax.random.key(0))")
    try:
        expected = jax.eval_shape(model.init, jax.random.key(0))
    except Exception:  # noqa: BLE001 - an init that needs concrete values: nothing to compare
        expected = None
    given = {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    if expected is not None:
        want = {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
        problems = [f"missing leaf {k!r}" for k in want if k not in given]
        problems += [f"unexpected leaf {k!r}" for k in given if k not in want]
        problems += [f"leaf {k!r} has shape {tuple(np.shape(given[k]))} where the model's init "
                     f"gives {tuple(v.shape)}"
                     for k, v in want.items() if k in given and np.shape(given[k]) != v.shape]
        problems += [f"leaf {k!r} has dtype {np.asarray(given[k]).dtype} where the model's init "
                     f"gives {v.dtype} (params are trained by gradients: floating point)"
                     for k, v in want.items() if k in given and jnp.issubdtype(v.dtype, jnp.inexact)
                     and not jnp.issubdtype(jnp.result_type(given[k]), jnp.inexact)]
        if problems:
            raise ValueError(f"{name} do not fit the model: {'; '.join(problems[:5])}. Start "
                             "from the model's own params (model.init(key)) or a run's "
                             "result.params")
    for k, x in given.items():
        if isinstance(x, jax.core.Tracer):
            continue
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
            bad = int(np.sum(~np.isfinite(x)))
            raise ValueError(f"{name} hold non-finite values (NaN or inf): {bad} of {x.size} in "
                             f"leaf {k!r}; every client would diverge from them")


def check_features(data: FederatedData, name: str, *, finite: bool = True) -> None:
    """Raises if a feature cannot go to the device (strings, bytes, Python objects) or, for
    an in-memory population (`finite`), holds NaN or inf values, naming the first client.

    A population read cohort by cohort is checked as it is read (`check_rows`); one resident
    on the device would otherwise take NaNs (from a `data.map` dividing by a zero standard
    deviation, say) into every client's training, and the run would read as diverging.
    """
    for k, v in data.features.items():
        if np.dtype(v.dtype).kind in "USO":
            raise ValueError(
                f"{name}: feature {k!r} has dtype {v.dtype} (strings, bytes or objects); every "
                "feature goes to the device, so each must be numeric: encode it (e.g. "
                "data.map(fn) to token ids) or drop it")
        if not (finite and isinstance(v, np.ndarray) and np.dtype(v.dtype).kind == "f"):
            continue
        step = max(1, (1 << 24) // max(1, int(np.prod(v.shape[1:]))))  # bounded temporaries
        for lo in range(0, len(v), step):
            ok = np.isfinite(v[lo:lo + step].reshape(min(step, len(v) - lo), -1)).all(axis=1)
            if not ok.all():
                row = lo + int(np.argmin(ok))
                client = data.client_ids[int(np.searchsorted(data.offsets, row, "right") - 1)]
                raise ValueError(f"{name}: feature {k!r} has non-finite values (NaN or inf), "
                                 f"first in example {row} (client {str(client)!r})")


def check_some_client_trains(batching, data: FederatedData) -> None:
    """Raises when no client of `data` takes a local step (with `drop_remainder`, clients
    smaller than a batch get weight 0), which would otherwise read as a run whose every
    client is excluded."""
    b = batching.resolve_batch_size(data)
    steps, _ = batching.steps_and_length(batching.examples_used(data.num_examples), b)
    if data.num_clients and not np.any(steps > 0):
        largest = int(batching.examples_used(data.num_examples).max())
        raise ValueError(f"no client has a full batch of {b} examples with drop_remainder=True "
                         f"(the largest uses {largest}): lower batch_size, or turn "
                         "drop_remainder off")


def check_evaluation(eval_data: FederatedData | None, eval_every: int,
                     eval_clients: int | None) -> FederatedData | None:
    """The evaluation arguments of a run (`Simulation`'s, a sweep's): the population checked,
    and eval_every or eval_clients refused without it."""
    if eval_data is not None:
        eval_data = check_not_empty(check_data("eval_data", eval_data), "eval_data")
    elif eval_every or eval_clients is not None:
        raise ValueError(f"{'eval_every' if eval_every else 'eval_clients'} is set but no "
                         "eval_data was given")
    if eval_clients is not None:
        check_eval_clients(eval_clients, eval_data, "eval_clients")
    return eval_data


def check_algorithm_fits(algorithm, train: FederatedData, params: Any, cohort_size: int, *,
                         finite: bool = True) -> None:
    """An algorithm against its training population before anything compiles: the model on
    the data and params, its id features' ranges, its own data check, a client that trains,
    and a chain stage's cohort bound (Krum's n > 2f + 2)."""
    check_model_fits(algorithm.model, train, params,
                     algorithm.batching.resolve_batch_size(train), finite=finite)
    for feature, num_ids in algorithm.id_features:
        check_labels(train, feature, num_ids, what=feature)
    if algorithm.check_data is not None:
        algorithm.check_data(train)
    check_some_client_trains(algorithm.batching, train)
    cohort_check = getattr(algorithm.aggregator, "check", None)
    if cohort_check is not None:
        cohort_check(cohort_size)


def check_model_fits(model, data: FederatedData, params: Any, batch_size: int,
                     name: str = "train", *, finite: bool = True) -> None:
    """Fails early, with a clear message, on a model that does not fit the data or params;
    `finite` checks every in-memory value (see `check_features`)."""
    check_features(data, name, finite=finite)
    check_params(model, params)
    if model.inputs is not None:
        key, shape, num_ids = model.inputs
        if key not in data.features:
            raise ValueError(f"{name} has no input feature {key!r} for the model; features: "
                             f"{sorted(data.features)}")
        got = tuple(data.features[key].shape[1:])
        if num_ids is not None:
            check_labels(data, key, num_ids, what="token")
        if shape is not None and math.prod(got) != math.prod(shape):
            hint = ("; a 1-D array holds one number per example: give it a trailing axis of "
                    "features" if got == () else "")
            raise ValueError(
                f"{name}: feature {key!r} has {math.prod(got)} value(s) per example (shape "
                f"{got}) but the model expects {math.prod(shape)} (shape {tuple(shape)}){hint}")
    if model.label is not None:
        check_labels(data, *model.label)
    b = min(batch_size, data.total_examples)
    sample = {k: v[:b] for k, v in data.features.items()}
    try:
        out = jax.eval_shape(model.loss, params, sample, jax.random.key(0))
    except Exception as e:  # noqa: BLE001 - re-raised with the context a user needs
        raise ValueError(f"model.loss failed on a batch of {b} examples with features "
                         f"{ {k: v.shape for k, v in sample.items()} }: {e}") from e
    if out.shape != (b,):
        raise ValueError(
            f"model.loss must return one value per example: shape ({b},) for a batch of {b}, "
            f"got {out.shape}")


def check_sizes(name: str, value: Any) -> tuple[int, ...]:
    """A shape or list of layer widths as a tuple of positive ints; one int is one entry."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, tuple | list):
        raise TypeError(f"{name} must be a tuple of positive integers, e.g. (200,), got {value!r}")
    for v in value:
        check_integer(f"each entry of {name}", v, 1)
    return tuple(int(v) for v in value)


def check_output_dir(path: str | os.PathLike, what: str = "output_dir") -> Path:
    """The output directory, created; raises naming it when it is a file or cannot be made."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file, not a directory: pass a "
                         "directory (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r} cannot be created: {e.strerror}") from e
    return path
