"""Which rank owns which preconditioner block: a balanced assignment by a cost model."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

__all__ = ["assign_owners"]


def assign_owners(
    memory: Sequence[float], flops: Sequence[float], numels: Sequence[float], world_size: int
) -> list[int]:
    """The owner rank of every block, balancing preconditioner memory, update FLOPs and the size
    of the update each owner sends (the block's number of elements; the padded all-gather moves
    ``world_size x`` the largest rank's total).

    Each block's cost is ``memory_i / sum(memory) + flops_i / sum(flops) + numel_i / sum(numel)``
    (the three resources weigh equally); blocks go, most expensive first, to the rank with the
    least cost so far (ties: the lowest rank): the longest-processing-time rule, within 4/3 of the
    best balance. Deterministic, so every rank computes the same answer without communicating.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size!r} is invalid: expected an int >= 1")
    if not len(memory) == len(flops) == len(numels):
        raise ValueError(
            f"{len(memory)} memory, {len(flops)} FLOP and {len(numels)} size costs: expected one of each per block"
        )
    totals = [sum(values) or 1.0 for values in (memory, flops, numels)]
    costs = [m / totals[0] + f / totals[1] + n / totals[2] for m, f, n in zip(memory, flops, numels)]
    owners = [0] * len(costs)
    loads = [(0.0, rank) for rank in range(world_size)]
    for block in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[block] = rank
        heapq.heappush(loads, (load + costs[block], rank))
    return owners
