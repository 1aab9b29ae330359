"""Preconditioner blocks and the plan of one step.

A block is what one preconditioner acts on: one tensor (``scope = "tensor"`` families) or every
trainable parameter of a param group flattened into one vector (``scope = "group"``). Its state
lives in ``optimizer.state[block.key]``, keyed by its first parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .preconditioners import Preconditioner, get_preconditioner
from .schedules import update_probability
from .validation import DTYPES

__all__ = ["BlockPlan", "block_statistics", "plan_blocks", "storage_dtype", "work_dtype"]


@dataclass(slots=True)
class BlockPlan:
    """One block in one step: its param group, parameters, family and whether it fits ``Q`` now."""

    group: dict[str, Any]
    params: list[Tensor]
    family: type[Preconditioner]
    fits: bool = False
    shape: torch.Size = field(init=False)

    def __post_init__(self) -> None:
        first = self.params[0]
        self.shape = first.shape if len(self.params) == 1 else torch.Size([sum(p.numel() for p in self.params)])

    @property
    def schedule(self) -> Any:
        """The group's preconditioner update schedule (:mod:`.schedules`)."""
        return self.group["precond_update_prob"]

    def new_state(self, owner: bool) -> dict[str, Any]:
        """Fresh state: the update schedule's counters (and a whole-vector block's members, as
        indices into the group's parameters, so that freezing one keeps the block); on the block's
        owner also the family's
        state (``Q = I``, or ``precond_init_scale I``; else the scale is pending, see
        :mod:`.fitting`), the momentum, the fit counters, the gradient energy of Adam's floor and the update
        RMS history of the growth cap."""
        group, first = self.group, self.key
        skipped = torch.zeros((), dtype=torch.int64, device=first.device)  # counted on the device
        state = dict(step=0, skipped_steps=skipped, update_credit=1.0 - update_probability(self.schedule, 0))
        if self.family.scope == "group":
            members = {id(p) for p in self.params}
            state["block"] = [i for i, p in enumerate(group["params"]) if id(p) in members]
        if not owner:
            return state
        state.update(self.family.init_state(self.shape, group, storage_dtype(group, first), first.device))
        if group["momentum"] > 0:
            state["momentum"] = torch.zeros(self.shape, dtype=first.dtype, device=first.device)
        state["precond_updates"] = 0
        state["rejected_fits"] = torch.zeros((), dtype=torch.int64, device=first.device)
        state["clipped_updates"] = torch.zeros((), dtype=torch.int64, device=first.device)  # .update.clip_amplitudes_
        state["grad_energy"] = torch.zeros(2, dtype=torch.float32, device=first.device)  # .update.adam_floors
        state["update_rms"] = torch.zeros(2, dtype=torch.float32, device=first.device)  # .update.guard_scales
        state["scale_pending"] = group["precond_init_scale"] is None
        if group["precond_init_scale"] is not None:
            self.family.set_scale(state, torch.tensor(float(group["precond_init_scale"]), device=first.device))
        return state

    @property
    def key(self) -> Tensor:
        """The parameter that keys the block's state."""
        return self.params[0]

    def gather(self, tensors: Mapping[Tensor, Tensor]) -> Tensor:
        """The block-shaped view of per-parameter tensors (zeros where one is missing)."""
        if len(self.params) == 1:
            return tensors[self.params[0]]
        return torch.cat(
            [
                tensors[p].reshape(-1) if p in tensors else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                for p in self.params
            ]
        )

    def scatter(self, flat: Tensor) -> list[Tensor]:
        """A block-shaped tensor split back into per-parameter views."""
        if len(self.params) == 1:
            return [flat]
        return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in self.params]), self.params)]


def plan_blocks(groups: list[dict[str, Any]], states: Mapping[Tensor, Mapping[str, Any]]) -> list[BlockPlan]:
    """Every param group split into blocks (``fits`` not yet decided): a block per trainable tensor,
    or one per group for whole-vector families (the members recorded in its state, else the
    trainable parameters)."""
    plans = []
    for group in groups:
        family = get_preconditioner(group["preconditioner"])
        trainable = [p for p in group["params"] if p.requires_grad]
        if family.scope == "tensor":
            plans.extend(BlockPlan(group, [p], family) for p in trainable)
            continue
        members = _recorded_members(group, states)
        if members is not None and any(all(p is not m for m in members) for p in trainable):
            raise ValueError(
                f"preconditioner={group['preconditioner']!r}: a parameter of this param group became trainable "
                "after the group's preconditioner was made, which cannot grow; put it in a new param group "
                "(optimizer.add_param_group)"
            )
        members = members if members is not None else trainable
        if members:
            plans.append(BlockPlan(group, members, family))
    return plans


def _recorded_members(group: Mapping[str, Any], states: Mapping[Tensor, Mapping[str, Any]]) -> list[Tensor] | None:
    params = group["params"]
    for p in params:
        recorded = (states.get(p) or {}).get("block")
        if recorded is not None:
            return [params[i] for i in recorded]
    return None


def storage_dtype(group: Mapping[str, Any], param: Tensor) -> torch.dtype:
    """The preconditioner's storage dtype: ``precond_dtype``, else float32 (float64 for float64 parameters)."""
    if group["precond_dtype"] is not None:
        return DTYPES[group["precond_dtype"]]
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def work_dtype(group: Mapping[str, Any], param: Tensor) -> torch.dtype:
    """The dtype of fits and probes: the storage dtype lifted to at least float32."""
    return torch.promote_types(storage_dtype(group, param), torch.float32)


def block_statistics(blocks: Sequence[tuple[BlockPlan, Mapping[str, Any]]]) -> dict[str, float]:
    """Figures for training logs over ``(plan, state)`` pairs of owned blocks: ``precond_updates``
    (fits tried, summed over blocks), ``rejected_fits`` (fits undone: a stall or a non-finite result,
    see :mod:`.fitting`; summed), ``clipped_updates`` (steps whose whitened update had elements clipped,
    :func:`~.update.clip_amplitudes_`; summed), ``skipped_steps`` (of the most-skipped block), ``update_prob``
    (largest current update probability) and ``precond_scale_min|median|max`` (of ``tr(P) / n``: a
    health figure; the extremes can come from parameters with little or no gradient, such as
    attention key biases). Two host syncs; meant for logging steps."""
    updates, skipped, probability, scales, rejected, clipped = 0, 0, 0.0, [], [], []
    for plan, state in blocks:
        updates += state["precond_updates"]
        rejected.append(state["rejected_fits"])
        clipped.append(state["clipped_updates"])
        skipped = max(skipped, int(state["skipped_steps"]))
        probability = max(probability, update_probability(plan.schedule, state["step"]))
        scales.append(plan.family.mean_diagonal(state))
    figures = {"precond_updates": float(updates), "skipped_steps": float(skipped), "update_prob": probability}
    for name, counts in (("rejected_fits", rejected), ("clipped_updates", clipped)):
        figures[name] = float(torch.stack([c.to(counts[0].device) for c in counts]).sum()) if counts else 0.0
    if scales:
        stacked = torch.stack([s.to(scales[0].device) for s in scales])
        low, middle, high = torch.stack([stacked.min(), stacked.median(), stacked.max()]).tolist()
        figures.update(precond_scale_min=low, precond_scale_median=middle, precond_scale_max=high)
    return figures
