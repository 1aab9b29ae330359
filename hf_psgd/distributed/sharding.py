"""The collectives of a step with sharded preconditioners (ZeRO-1 style, after Distributed
Shampoo's DDP distributor).

Every preconditioner block has one owner rank (:func:`.ownership.assign_owners`). Only the owner
holds the block's preconditioner and momentum and computes its update ``u = P m``; one
``all_gather`` per step then hands every rank every update, and every rank applies all of them, so
parameters stay bit-identical across ranks (owners apply the communicated, rounded values too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..optim.blocks import BlockPlan
from ..optim.checkpoint import copy_to_device
from ..optim.distribution import Distribution
from .collectives import all_reduce_mean_, group_device
from .ownership import assign_owners

__all__ = ["DataParallelOwners"]

#: the per-block state every rank keeps (the update schedule must agree everywhere; a whole-vector
#: block's members, ``"block"``, too)
SCHEDULE_COUNTERS = ("step", "skipped_steps", "update_credit")


class DataParallelOwners(Distribution):
    """Data parallelism with owned preconditioners (ZeRO-1 style): every block has one owner rank,
    chosen by :func:`.ownership.assign_owners` from the families' cost model; gradients arrive
    averaged (DDP); one ``all_gather`` per step shares the owners' updates.

    Args:
        group: the process group (``None``: the default group).
        communication_dtype: dtype of the exchanged updates.
    """

    exchanges = True

    def __init__(self, group: dist.ProcessGroup | None, communication_dtype: torch.dtype) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.communication_dtype = communication_dtype
        #: elements each rank sent in the last exchange (the padded shard width); for benchmarks
        self.last_shard_numel = 0
        #: owner rank of every block seen so far, keyed by the block's first parameter
        self.owners: dict[Tensor, int] = {}
        #: how long a process waits in a state gather for the others before it raises
        self.state_dict_timeout = timedelta(seconds=300)
        # states travel pickled on the CPU, in a gloo group of their own: a timed-out gather breaks the
        # group it ran in. Creating it is a collective: a sharded PSGD is built on every rank.
        self._state_group = dist.new_group(backend="gloo")

    def assign(self, plans: Sequence[BlockPlan]) -> None:
        new = [plan for plan in plans if plan.key not in self.owners]
        if not new:
            return
        costs = [plan.family.cost(plan.shape, plan.group) for plan in new]
        numels = [plan.shape.numel() for plan in new]
        ranks = assign_owners([m for m, _ in costs], [f for _, f in costs], numels, self.world_size)
        self.owners.update({plan.key: rank for plan, rank in zip(new, ranks)})

    def owns(self, plan: BlockPlan) -> bool:
        return self.owners[plan.key] == self.rank

    def average_(self, tensors: Iterable[Tensor]) -> None:
        all_reduce_mean_(tensors, self.group)

    def exchange(self, plans: Sequence[BlockPlan], updates: Mapping[Tensor, Tensor]) -> Mapping[Tensor, Tensor]:
        mine = {i: updates[plan.key] for i, plan in enumerate(plans) if plan.key in updates}
        numels = [plan.shape.numel() for plan in plans]
        shared = self.exchange_flat(numels, [self.owners[plan.key] for plan in plans], mine)
        return {
            p: u for plan, flat in zip(plans, shared) for p, u in zip(plan.params, plan.scatter(flat.view(plan.shape)))
        }

    def agree(self, flag: Tensor) -> Tensor:
        values = flag.to(group_device(self.group), torch.float32).reshape(1)
        dist.all_reduce(values, op=dist.ReduceOp.MIN, group=self.group)
        return (values[0] > 0).to(flag.device)

    def gather_state(self, local: dict[str, Any], owned: set[int]) -> dict[str, Any]:
        """Every owner's state (a collective over a gloo group). Every process must call it: one that
        waits longer than :attr:`state_dict_timeout` for the others raises instead of hanging."""
        try:
            dist.monitored_barrier(self._state_group, timeout=self.state_dict_timeout)
        except RuntimeError as error:
            raise RuntimeError(
                f"PSGD's preconditioners are sharded over {self.world_size} processes, so state_dict() is a "
                f"collective that every process must call (Accelerate's save_state and PSGDTrainer do); rank "
                f"{self.rank} waited {self.state_dict_timeout.total_seconds():g} s for the others "
                f"({str(error).splitlines()[0]})"
            ) from None
        mine = {index: state for index, state in local["state"].items() if index in owned}
        mine = copy_to_device(mine, torch.device("cpu"))
        return {"state": self.gather_states(mine), "param_groups": local["param_groups"]}

    def state_dict(self, local: dict[str, Any], gather: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if not any(local["state"].values()):  # nothing sharded yet (Accelerate's prepare)
            return local
        return {"state": gather()["state"], "param_groups": local["param_groups"]}

    def keep_loaded(self, owned: bool, value: dict[str, Any]) -> dict[str, Any]:
        return value if owned else {key: value[key] for key in (*SCHEDULE_COUNTERS, "block") if key in value}

    def exchange_flat(self, numels: Sequence[int], owners: Sequence[int], mine: Mapping[int, Tensor]) -> list[Tensor]:
        """Every block's update on every rank, from the owners' updates ``mine`` (block index ->
        update), by one ``all_gather`` of equal-size buffers (gloo rejects unequal shapes): rank
        ``r`` sends its blocks' updates concatenated in block order, zero-padded to the largest
        rank's total. Returns flat views in ``communication_dtype``, in block order."""
        sizes = [0] * self.world_size
        for numel, owner in zip(numels, owners):
            sizes[owner] += numel
        width = max(sizes)
        device = next(iter(mine.values())).device if mine else group_device(self.group)
        send = torch.zeros(width, dtype=self.communication_dtype, device=device)
        offset = 0
        for index in sorted(mine):
            update = mine[index].reshape(-1)
            send[offset : offset + update.numel()].copy_(update)
            offset += update.numel()
        received = torch.empty(self.world_size * width, dtype=self.communication_dtype, device=device)
        dist.all_gather(list(received.view(self.world_size, width).unbind(0)), send, group=self.group)
        self.last_shard_numel = width
        offsets = [rank * width for rank in range(self.world_size)]
        updates = []
        for numel, owner in zip(numels, owners):
            updates.append(received[offsets[owner] : offsets[owner] + numel])
            offsets[owner] += numel
        return updates

    def gather_states(self, mine: dict[int, Any]) -> dict[int, Any]:
        """The union of every rank's ``mine`` (state index -> state, tensors on the CPU: the states
        travel pickled), on every rank."""
        everyone: list[dict[int, Any] | None] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self._state_group)
        merged: dict[int, Any] = {}
        for states in everyone:
            merged.update(states or {})
        return dict(sorted(merged.items()))
