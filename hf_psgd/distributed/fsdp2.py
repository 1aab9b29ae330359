"""FSDP2: owned preconditioners of parameters sharded on dim 0 (the pattern of Distributed
Shampoo's lossless FSDP2 distributor and heavyball's FSDP1 path).

``fully_shard`` leaves every rank a ``DTensor`` shard of each parameter and of its (averaged)
gradient: the rows ``[r c, (r + 1) c)`` of dim 0, ``c = ceil(rows / world_size)`` (``torch.chunk``).
Every preconditioner block has one owner rank (the data-parallel cost model). One step:

1. one ``all_to_all_single`` sends every gradient shard to its block's owner, which concatenates
   the shards into the whole gradient;
2. the owner computes the block's update ``u = P m`` exactly as one process would;
3. one ``all_to_all_single`` sends every rank the rows of ``u`` of its shard, which it applies.

Each rank keeps the preconditioner and momentum of the blocks it owns (about ``1 / world_size`` of
the whole, plus at most the largest block) and never the whole model's gradients; parameters stay
sharded. Its ``state_dict()`` holds its own blocks (and every block's counters), for
``torch.distributed.checkpoint``, which saves each rank's part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import reduce
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from ..optim.blocks import BlockPlan
from .collectives import group_device
from .sharding import DataParallelOwners

__all__ = ["FullyShardedOwners"]


class FullyShardedOwners(DataParallelOwners):
    """Owners of whole-tensor blocks of FSDP2 parameters (``DTensor`` sharded on dim 0 of a 1-D
    device mesh): gradient shards to the owners and updated rows back, by ``all_to_all_single``.

    Args:
        group: the process group of the parameters' device mesh.
        communication_dtype: dtype of the exchanged updates (gradients travel in their own dtype,
            promoted to at least float32).
    """

    sharded_parameters = True

    def __init__(self, group: dist.ProcessGroup, communication_dtype: torch.dtype) -> None:
        super().__init__(group, communication_dtype)
        #: bytes this rank sent to the others in the last step (gradients and updates); for benchmarks
        self.last_sent_bytes = 0
        #: the step's blocks are exchanged in this many buckets (two ``all_to_all_single`` each), so that
        #: a rank holds the whole gradients and updates of about ``1 / bucket_count`` of its blocks at once
        self.bucket_count = 4
        #: fewer buckets where one would hold fewer whole-gradient bytes (fp32) of the busiest owner than this
        self.min_bucket_bytes = 1 << 20

    @classmethod
    def for_groups(cls, groups: Sequence[Mapping[str, Any]], communication_dtype: torch.dtype) -> FullyShardedOwners:
        """The strategy for param groups of FSDP2 parameters; refuses, in one line, what it cannot do."""
        params = [p for group in groups for p in group["params"]]
        meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
        for param in params:
            if not isinstance(param, DTensor):
                raise ValueError(
                    "PSGD got FSDP2 (DTensor) parameters and plain ones in one optimizer: apply fully_shard to the "
                    "root module too (it shards every parameter), or give the plain ones their own optimizer"
                )
            if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
                raise ValueError(
                    f"PSGD supports DTensor parameters sharded on dim 0 over a 1-D device mesh (fully_shard); got "
                    f"placements {tuple(param.placements)} on a mesh of shape {tuple(param.device_mesh.shape)}: tensor "
                    "parallelism, HSDP and other placements are not supported (use FSDP2 alone, or DDP)"
                )
        if len(meshes) > 1:
            raise ValueError(f"PSGD got parameters on {len(meshes)} device meshes: expected one (fully_shard's)")
        for group in groups:
            if group["curvature"] != "whiten":
                raise ValueError(
                    f"curvature={group['curvature']!r} is not supported with FSDP2 parameters: H v needs gradients "
                    "with respect to the whole parameters, which FSDP2 gathers only inside forward and backward; "
                    "use curvature='whiten' under FSDP2, or train with DDP"
                )
        return cls(meshes.pop().get_group(), communication_dtype)

    def local(self, tensor: Tensor) -> Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    def assign(self, plans: Sequence[BlockPlan]) -> None:
        for plan in plans:
            if plan.key not in self.owners:
                for param in plan.params:
                    self._check_layout(param)
        super().assign(plans)

    def buckets(self, plans: Sequence[BlockPlan]) -> list[list[BlockPlan]]:
        """Up to :attr:`bucket_count` buckets, each with about the same share of every owner's blocks
        (by elements, in block order), so that no rank's share of one bucket is much more than
        ``1 / bucket_count`` of what it owns. Called once per step (it starts :attr:`last_sent_bytes`)."""
        self.last_sent_bytes = 0
        owned = [0] * self.world_size
        for plan in plans:
            owned[self.owners[plan.key]] += plan.shape.numel()
        count = max(1, min(self.bucket_count, 4 * max(owned) // self.min_bucket_bytes))
        buckets: list[list[BlockPlan]] = [[] for _ in range(count)]
        seen = [0] * self.world_size
        for plan in plans:
            owner = self.owners[plan.key]
            buckets[seen[owner] * count // max(owned[owner], 1)].append(plan)
            seen[owner] += plan.shape.numel()
        return [bucket for bucket in buckets if bucket]

    def gather_gradients(self, plans: Sequence[BlockPlan], grads: Mapping[Tensor, Tensor]) -> Mapping[Tensor, Tensor]:
        entries = [(p, self.owners[plan.key]) for plan in plans for p in plan.params if p in grads]
        mine = [p for p, owner in entries if owner == self.rank]
        dtype = reduce(torch.promote_types, [grads[p].dtype for p, _ in entries], torch.float32)
        received = self._all_to_all(
            [(owner, self.local(grads[p]).reshape(-1)) for p, owner in entries],
            [(source, self._numel(p, source)) for p in mine for source in range(self.world_size)],
            dtype,
        )
        pieces = iter(received)
        whole = {}
        for p in mine:
            flat = torch.cat([next(pieces) for _ in range(self.world_size)])
            whole[p] = flat.view(p.shape).to(grads[p].dtype)
        return whole

    def exchange(self, plans: Sequence[BlockPlan], updates: Mapping[Tensor, Tensor]) -> Mapping[Tensor, Tensor]:
        entries = [(p, self.owners[plan.key]) for plan in plans for p in plan.params]
        whole = {
            p: u for plan in plans if plan.key in updates for p, u in zip(plan.params, plan.scatter(updates[plan.key]))
        }
        sends = []
        for p, owner in entries:
            if owner == self.rank:
                flat = whole[p].reshape(-1)
                for target in range(self.world_size):
                    start, end = self._span(p, target)
                    sends.append((target, flat[start:end]))
        received = self._all_to_all(
            sends, [(owner, self._numel(p, self.rank)) for p, owner in entries], self.communication_dtype
        )
        return {p: piece.view(self.local(p).shape) for (p, _), piece in zip(entries, received)}

    def state_dict(self, local: dict[str, Any], gather: Any) -> dict[str, Any]:
        return local

    # ----------------------------------------------------------------------------- shards

    def _span(self, param: Tensor, rank: int) -> tuple[int, int]:
        """Rank ``rank``'s shard of ``param`` as the element range ``(start, end)`` of the flattened tensor."""
        rows = param.shape[0]
        chunk = -(-rows // self.world_size)
        first, inner = min(rank * chunk, rows), param.numel() // max(rows, 1)
        return first * inner, min(first + chunk, rows) * inner

    def _numel(self, param: Tensor, rank: int) -> int:
        """The number of elements of rank ``rank``'s shard of ``param``."""
        start, end = self._span(param, rank)
        return end - start

    def _check_layout(self, param: Tensor) -> None:
        start, end = self._span(param, self.rank)
        shard = self.local(param)
        if shard.numel() != end - start or (shard.numel() and shard.shape[1:] != param.shape[1:]):
            rows = (end - start) // max(param.numel() // max(param.shape[0], 1), 1)
            raise ValueError(
                f"PSGD: rank {self.rank} holds a shard of shape {tuple(shard.shape)} of a parameter of shape "
                f"{tuple(param.shape)}; expected the {rows} rows of dim 0 that torch.chunk gives it"
            )

    def _all_to_all(
        self, sends: list[tuple[int, Tensor]], receives: list[tuple[int, int]], dtype: torch.dtype
    ) -> list[Tensor]:
        """One ``all_to_all_single``: ``sends`` are ``(target rank, flat tensor)`` and ``receives``
        ``(source rank, number of elements)``, each in the order every rank lists them (the blocks'
        order), so that what a source sends a target in order is what the target expects of it."""
        device = sends[0][1].device if sends else group_device(self.group)
        to_target = sorted(range(len(sends)), key=lambda i: sends[i][0])
        from_source = sorted(range(len(receives)), key=lambda i: receives[i][0])
        send_sizes = [0] * self.world_size
        for target, tensor in sends:
            send_sizes[target] += tensor.numel()
        receive_sizes = [0] * self.world_size
        for source, numel in receives:
            receive_sizes[source] += numel
        buffer = (
            torch.cat([sends[i][1].to(dtype) for i in to_target])
            if sends
            else torch.empty(0, dtype=dtype, device=device)
        )
        out = torch.empty(sum(receive_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(out, buffer, receive_sizes, send_sizes, group=self.group)
        self.last_sent_bytes += (sum(send_sizes) - send_sizes[self.rank]) * buffer.element_size()
        chunks = out.split([receives[i][1] for i in from_source])
        result: list[Tensor] = [out] * len(receives)
        for index, chunk in zip(from_source, chunks):
            result[index] = chunk
        return result
