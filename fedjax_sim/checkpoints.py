"""Checkpoints of a run, with orbax: the server state, the client store and a JSON of the rest
(the round reached, the chunk size, the history, the configuration's fingerprint).

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed mid-write leaves the earlier checkpoints whole; `restore` takes the newest
checkpoint that reads back, warning about any newer one that does not.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from fedjax_sim.client_store import HostStore


def _saveable(state) -> Any:
    """The state with its typed PRNG key as raw key data (orbax stores plain arrays)."""
    return state._replace(key=jax.random.key_data(state.key))


class Checkpoints:
    """The checkpoints in `directory` (one subdirectory per round), the newest `keep` kept."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False))

    def rounds(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, round_num: int, state, store, meta: dict) -> None:
        if round_num in self.manager.all_steps():  # saved already, or a corrupt one left
            self.manager.delete(round_num)
        arrays = {"state": _saveable(state), "store": store if store is not None else {}}
        self.manager.save(round_num, args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, state, store) -> tuple[Any, Any, dict] | None:
        """(state, store, meta) of the newest readable checkpoint, shaped and placed like the
        given `state` and `store`; None when there is none."""
        # A host store's numpy arrays are their own template: they restore as numpy, not
        # onto the device.
        template = {"state": jax.tree.map(ocp.utils.to_shape_dtype_struct, _saveable(state)),
                    "store": {} if store is None else store if isinstance(store, HostStore)
                    else jax.tree.map(ocp.utils.to_shape_dtype_struct, store)}
        errors = []
        for r in reversed(self.rounds()):
            try:
                out = self.manager.restore(r, args=ocp.args.Composite(
                    arrays=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous
                errors.append(f"{self.directory / str(r)}: {type(e).__name__}: {e}"[:300])
                warnings.warn(f"checkpoint {self.directory / str(r)} cannot be read "
                              f"({type(e).__name__}); falling back to the one before",
                              stacklevel=3)
                continue
            arrays = out["arrays"]
            restored = arrays["state"]._replace(
                key=jax.random.wrap_key_data(arrays["state"].key, impl=jax.random.key_impl(
                    state.key)))
            return restored, (arrays["store"] if store is not None else None), out["meta"]
        if errors:
            raise ValueError(f"no checkpoint in {self.directory} can be read: "
                             + "; ".join(errors))
        return None
