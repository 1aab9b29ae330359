"""The collectives of a step with sharded preconditioners (ZeRO-1 style, after Distributed
Shampoo's DDP distributor).

Every preconditioner block has one owner rank (:func:`.ownership.assign_owners`). Only the owner
holds the block's preconditioner and momentum and computes its update ``u = P m``; one
``all_gather`` per step then hands every rank every update, and every rank applies all of them, so
parameters stay bit-identical across ranks (owners apply the communicated, rounded values too).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["PreconditionerSharding", "reject_sharded_parameters"]


def reject_sharded_parameters(params: Iterable[Tensor]) -> None:
    """Raise ``ValueError`` for parameters sharded by FSDP (``DTensor`` of FSDP2, flat parameters of
    FSDP1): Kronecker factors and whole-vector preconditioners need whole tensors, and fitting them
    to shards would be silently wrong."""
    from torch.distributed.tensor import DTensor

    for param in params:
        if isinstance(param, DTensor) or getattr(param, "_fsdp_flattened", False):
            kind = "a DTensor (FSDP2 / tensor parallel)" if isinstance(param, DTensor) else "flattened by FSDP"
            raise ValueError(
                f"PSGD got a parameter that is {kind}: its preconditioners need whole tensors. Train with DDP "
                "instead (accelerate launch --multi_gpu, torchrun, or Trainer without fsdp): PSGD then shards its "
                "preconditioner state over the processes itself (shard_preconditioners), like ZeRO-1."
            )


class PreconditionerSharding:
    """Ownership and collectives for one process group.

    Args:
        group: the process group (``None``: the default group).
        communication_dtype: dtype of the exchanged updates.
    """

    def __init__(self, group: dist.ProcessGroup | None, communication_dtype: torch.dtype) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.communication_dtype = communication_dtype
        #: elements each rank sent in the last exchange (the padded shard width); for benchmarks
        self.last_shard_numel = 0

    def exchange(self, numels: Sequence[int], owners: Sequence[int], mine: Mapping[int, Tensor]) -> list[Tensor]:
        """Every block's update on every rank, from the owners' updates ``mine`` (block index ->
        update), by one ``all_gather`` of equal-size buffers (gloo rejects unequal shapes): rank
        ``r`` sends its blocks' updates concatenated in block order, zero-padded to the largest
        rank's total. Returns flat views in ``communication_dtype``, in block order."""
        sizes = [0] * self.world_size
        for numel, owner in zip(numels, owners):
            sizes[owner] += numel
        width = max(sizes)
        device = next(iter(mine.values())).device if mine else _group_device(self.group)
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
        dist.all_gather_object(everyone, mine, group=self.group)
        merged: dict[int, Any] = {}
        for states in everyone:
            merged.update(states or {})
        return dict(sorted(merged.items()))


def _group_device(group: dist.ProcessGroup | None) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
