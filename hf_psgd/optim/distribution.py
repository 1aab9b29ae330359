"""How PSGD's work is distributed over processes: the interface, and the single-process strategy.

The optimizer shell asks its strategy which blocks this process owns (only the owner keeps a
block's preconditioner and momentum and computes its update), to average what PSGD computes itself
(gradients of a closure, ``H v``), to agree on skipping a step, to share the owners' updates, and
to gather and scatter state for checkpoints. A single process owns everything and communicates
nothing; :mod:`hf_psgd.distributed` implements the multi-process strategies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .blocks import BlockPlan
from .validation import DTYPES, check, dtype_name

__all__ = ["Distribution", "reject_sharded_parameters", "resolve_distribution"]


class Distribution:
    """The single-process strategy, and the interface the multi-process ones override."""

    rank = 0
    world_size = 1

    def assign(self, plans: Sequence[BlockPlan]) -> None:
        """Give every block not seen before an owner (an assigned block never moves)."""

    def owns(self, plan: BlockPlan) -> bool:
        """Whether this process keeps the block's preconditioner and computes its update."""
        return True

    def average_(self, tensors: Iterable[Tensor]) -> None:
        """Average over the processes, in place, what PSGD computed itself (closure gradients, ``H v``)."""

    def exchange(self, plans: Sequence[BlockPlan], updates: Mapping[Tensor, Tensor]) -> Mapping[Tensor, Tensor]:
        """Every block's update (keyed by ``plan.key``) on every process, from the owners' ``updates``."""
        return updates

    def agree_finite(self, finite: bool) -> bool:
        """Whether every process found its step finite (all skip together, before any state changes)."""
        return finite

    def gather_state(self, local: dict[str, Any], owned: set[int]) -> dict[str, Any]:
        """Every owner's state (a collective), from this process's ``Optimizer.state_dict()`` and
        the indices of the parameters that key the blocks it owns."""
        return local

    def state_dict(self, local: dict[str, Any], gathered: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The world-size independent state: ``local`` here; elsewhere the owners' states, from
        ``gathered()`` (the last :meth:`gather_state` of this step, or a new one)."""
        return local

    def keep_loaded(self, owned: bool, value: dict[str, Any]) -> dict[str, Any]:
        """What this process keeps of a block's loaded state (all of it where it owns the block)."""
        return value


def resolve_distribution(shard: Any, communication_dtype: Any, params: Sequence[Tensor]) -> Distribution:
    """The strategy for ``PSGD(shard_preconditioners=..., communication_dtype=...)``."""
    check("shard_preconditioners", shard, shard in (None, True, False), "None (automatic), True or False")
    name = dtype_name(communication_dtype, "communication_dtype")
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if shard is None:
        shard = initialised and torch.distributed.get_world_size() > 1
    elif shard and not initialised:
        raise ValueError(
            "shard_preconditioners=True is invalid here: it needs an initialised torch.distributed process "
            "group (accelerate launch, torchrun or init_process_group); expected None (automatic) or False"
        )
    if not shard:
        return Distribution()
    from ..distributed import DataParallelOwners  # the layer above; imported only when sharding

    default = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return DataParallelOwners(None, DTYPES[name] if name else default)


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
