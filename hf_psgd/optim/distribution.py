"""How PSGD's work is distributed over processes: the interface, and the single-process strategy.

The optimizer shell asks its strategy which blocks this process owns (only the owner keeps a
block's preconditioner and momentum and computes its update), to average what PSGD computes itself
(gradients of a closure, ``H v``), to agree on a decision (skip a step), to bring the owners whole
gradients and share their updates, and to gather and scatter state for checkpoints. A single
process owns everything and communicates nothing; :mod:`hf_psgd.distributed` implements the
multi-process strategies: data parallelism (whole parameters on every process) and FSDP2
(parameters sharded on dim 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from .blocks import BlockPlan
from .validation import DTYPES, check, dtype_name

__all__ = ["Distribution", "resolve_distribution"]


class Distribution:
    """The single-process strategy, and the interface the multi-process ones override."""

    rank = 0
    world_size = 1
    #: whether the strategy takes parameters sharded as ``DTensor`` (FSDP2)
    sharded_parameters = False
    #: whether updates travel between processes in :meth:`exchange` (they leave their owner scaled)
    exchanges = False

    def assign(self, plans: Sequence[BlockPlan]) -> None:
        """Give every block not seen before an owner (an assigned block never moves)."""

    def owns(self, plan: BlockPlan) -> bool:
        """Whether this process keeps the block's preconditioner and computes its update."""
        return True

    def local(self, tensor: Tensor) -> Tensor:
        """What this process holds of a parameter or gradient (its shard of a sharded one)."""
        return tensor

    def average_(self, tensors: Iterable[Tensor]) -> None:
        """Average over the processes, in place, what PSGD computed itself (closure gradients, ``H v``)."""

    def agree(self, flag: Tensor) -> Tensor:
        """Whether every process says ``flag`` (a 0-dim bool tensor; the result stays on its device, so
        that every process masks a non-finite step together with no host sync)."""
        return flag

    def buckets(self, plans: Sequence[BlockPlan]) -> list[list[BlockPlan]]:
        """The step's blocks in the groups whose updates are computed and exchanged together (one
        group here; several bound the memory of whole gradients under FSDP2)."""
        return [list(plans)]

    def gather_gradients(self, plans: Sequence[BlockPlan], grads: Mapping[Tensor, Tensor]) -> Mapping[Tensor, Tensor]:
        """The whole gradient of every parameter of the blocks this process owns, from ``grads``."""
        return grads

    def exchange(self, plans: Sequence[BlockPlan], updates: Mapping[Tensor, Tensor]) -> Mapping[Tensor, Tensor]:
        """The update of what this process holds of every parameter of ``plans`` (keyed by parameter),
        from the owners' block-shaped ``updates`` (keyed by ``plan.key``)."""
        return {p: u for plan in plans for p, u in zip(plan.params, plan.scatter(updates[plan.key]))}

    def gather_state(self, local: dict[str, Any], owned: set[int]) -> dict[str, Any]:
        """Every owner's state (a collective), from this process's ``Optimizer.state_dict()`` and
        the indices of the parameters that key the blocks it owns."""
        return local

    def state_dict(self, local: dict[str, Any], gather: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """What ``state_dict()`` returns: ``local`` here; the owners' states from ``gather()`` where
        the result must be the same at every world size."""
        return local

    def keep_loaded(self, owned: bool, value: dict[str, Any]) -> dict[str, Any]:
        """What this process keeps of a block's loaded state (all of it where it owns the block)."""
        return value


def resolve_distribution(shard: Any, communication_dtype: Any, groups: Sequence[Mapping[str, Any]]) -> Distribution:
    """The strategy for ``PSGD(shard_preconditioners=..., communication_dtype=...)`` over the param
    groups' current parameters: FSDP2 owners for ``DTensor`` parameters, data-parallel owners in a
    multi-process job, else the single process. Refuses, in one line, what no strategy supports."""
    check("shard_preconditioners", shard, shard in (None, True, False), "None (automatic), True or False")
    name = dtype_name(communication_dtype, "communication_dtype")
    params = [p for group in groups for p in group["params"]]
    default = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    dtype = DTYPES[name] if name else default
    _reject_flattened_parameters(params)
    if any(isinstance(p, DTensor) for p in params):
        if shard is False:
            raise ValueError(
                "shard_preconditioners=False is invalid with FSDP2 (DTensor) parameters: each preconditioner needs "
                "its whole tensor, which only its owner rank gathers; expected None (automatic) or True"
            )
        from ..distributed import FullyShardedOwners  # the layer above; imported only when sharding

        return FullyShardedOwners.for_groups(groups, dtype)
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
    from ..distributed import DataParallelOwners

    return DataParallelOwners(None, dtype)


def _reject_flattened_parameters(params: Iterable[Tensor]) -> None:
    """Raise ``ValueError`` for parameters flattened into partitions (FSDP1's flat parameters,
    DeepSpeed ZeRO-3's partitions): Kronecker factors and whole-vector preconditioners need the
    tensors' shapes, and fitting them to flat partitions would be silently wrong."""
    for param in params:
        kind = "flattened by FSDP" if getattr(param, "_fsdp_flattened", False) else None
        kind = kind or ("partitioned by DeepSpeed ZeRO" if hasattr(param, "ds_id") else None)
        if kind:
            raise ValueError(
                f"PSGD got a parameter that is {kind}: its preconditioners need whole tensors. Train with FSDP2 "
                "(fully_shard, Accelerate fsdp_version: 2) or DDP (accelerate launch --multi_gpu, torchrun): PSGD then "
                "gives every preconditioner one owner process itself (shard_preconditioners)."
            )
