"""Which rank owns which preconditioner block: a balanced assignment by a cost model."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["assign_owners"]


def assign_owners(
    memory: Sequence[float], flops: Sequence[float], numels: Sequence[float], world_size: int
) -> list[int]:
    """The owner rank of every block, balancing preconditioner memory, update FLOPs and the size
    of the update each owner sends (the block's number of elements; the padded all-gather moves
    ``world_size x`` the largest rank's total).

    Each block's cost is ``flops_i / sum(flops) + numel_i / sum(numel)`` (a rank's work: the fit's and
    the preconditioning's products, and the elementwise passes and the update it sends, which scale with
    its elements); blocks go, most expensive first, to the rank with the least cost so far (ties: the
    lowest rank) among the ranks whose memory is still at most its share ``sum(memory) / world_size``
    (the rank with the least memory always is): the longest-processing-time rule, under which no rank's
    memory exceeds its share plus the largest block. Memory bounds the choice and is not part of the
    cost. Deterministic, so every rank computes the same answer without communicating.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size!r} is invalid: expected an int >= 1")
    if not len(memory) == len(flops) == len(numels):
        raise ValueError(
            f"{len(memory)} memory, {len(flops)} FLOP and {len(numels)} size costs: expected one of each per block"
        )
    total_flops, total_numel = sum(flops) or 1.0, sum(numels) or 1.0
    costs = [f / total_flops + n / total_numel for f, n in zip(flops, numels)]
    share = sum(memory) / world_size
    owners = [0] * len(costs)
    loads, held = [0.0] * world_size, [0.0] * world_size
    for block in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (held[r] > share, loads[r], r))
        owners[block] = rank
        loads[rank] += costs[block]
        held[rank] += memory[block]
    return owners
