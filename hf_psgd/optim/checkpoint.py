"""Optimizer state in checkpoints: copies to a device, and the checks of a loaded state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .blocks import BlockPlan, storage_dtype
from .preconditioners.base import tensor_shapes

__all__ = ["check_loaded_state", "conform_loaded_cache", "copy_to_device", "upgrade_loaded_state"]


def copy_to_device(value: Any, device: torch.device) -> Any:
    """A deep copy of nested dicts, lists and tuples with every tensor copied to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {k: copy_to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_to_device(v, device) for v in value)
    return value


def upgrade_loaded_state(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A block's loaded state in today's form: a state saved by hf_psgd 0.2.0 or older counts
    ``skipped_steps`` in an int and, on the block's owner, has no ``rejected_fits`` until its first fit;
    both are device tensors now (counted with no host sync). An owner's state saved before the clip of whitened
    steps has no ``clipped_updates`` (it counts from zero); one saved before 0.3.0 has no
    ``grad_energy`` (Adam's floor) and none saved before the growth cap has ``update_rms``: each starts from
    zero, as in a new state (its EMA bias-corrected; the growth cap starts again at the next update)."""
    if not isinstance(state.get("skipped_steps"), Tensor):
        state["skipped_steps"] = torch.tensor(state.get("skipped_steps", 0), device=device)
    for key in ("rejected_fits", "clipped_updates"):
        if "precond_updates" in state and key not in state:
            state[key] = torch.zeros((), dtype=torch.int64, device=device)
    for key in ("grad_energy", "update_rms"):
        if "precond_updates" in state and key not in state:
            state[key] = torch.zeros(2, dtype=torch.float32, device=device)
    return state


def _fresh_state(plan: BlockPlan) -> dict[str, Any]:
    """A new state of the block's family for the block, on the meta device (shapes and dtypes only)."""
    dtype = storage_dtype(plan.group, plan.key)
    return plan.family.init_state(plan.shape, plan.group, dtype, torch.device("meta"))


def conform_loaded_cache(plan: BlockPlan, state: dict[str, Any]) -> None:
    """Cast a loaded state's caches (:attr:`~.preconditioners.Preconditioner.cache_keys`, e.g. Kron's
    ``P``, saved in another ``apply_dtype`` or on another device) to the dtype the block's options give them
    now on the block's device (:meth:`~.preconditioners.Preconditioner.cache_dtype`)."""
    param = plan.key
    wanted = plan.family.cache_dtype(plan.group, storage_dtype(plan.group, param), param.device)
    for key in plan.family.cache_keys:
        if key in state:
            saved = state[key]
            state[key] = [t.to(wanted) for t in saved] if isinstance(saved, list) else saved.to(wanted)


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def check_loaded_state(plan: BlockPlan, state: Mapping[str, Any], index: int, owned: bool) -> None:
    """Refuse, in one line, a block's loaded state (parameter ``index`` in ``state_dict`` order) that
    another family or another shape of block made, or with a value that is not finite. A state of
    counters only (what a process keeps of blocks it does not own under sharding) passes, unless this
    process owns the block and it has taken steps: its preconditioner is missing from the checkpoint."""
    where = f"load_state_dict: state of parameter {index}"
    if owned and "precond_updates" not in state and state.get("step", 0) > 0:
        raise ValueError(
            f"{where} holds only update counters: the checkpoint was saved by a process that did not own this "
            "block, so its preconditioner and momentum are missing (under FSDP2 save through "
            "torch.distributed.checkpoint, e.g. Accelerate's SHARDED_STATE_DICT, or call "
            "optimizer.consolidate_state_dict() on every process before a full state_dict())"
        )
    keys = plan.family.state_keys
    present = [key for key in keys if key in state]
    if present and len(present) < len(keys) or not present and "precond_updates" in state:
        raise ValueError(f"{where} has keys {sorted(state)}, not those of preconditioner={plan.family.name!r} {keys}")
    if present:
        fresh = _fresh_state(plan)
        if not plan.family.made_for(plan.shape, state, fresh):
            key = next((key for key in keys if tensor_shapes(state[key]) != tensor_shapes(fresh[key])), keys[0])
            raise ValueError(
                f"{where}: {key!r} has shape {tensor_shapes(state[key])}, but preconditioner={plan.family.name!r} of a "
                f"block of shape {tuple(plan.shape)} has {tensor_shapes(fresh[key])} (saved for another model?)"
            )
    if "momentum" in state and tuple(state["momentum"].shape) != tuple(plan.shape):
        shape = tuple(state["momentum"].shape)
        raise ValueError(f"{where}: momentum of shape {shape} for a block of shape {tuple(plan.shape)}")
    for tensor in _tensors(state):
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise ValueError(f"{where}: a value is not finite (NaN or Inf), which would poison training")
