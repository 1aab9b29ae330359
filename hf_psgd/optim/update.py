"""The parameter update: the non-finite check, the update-size guard and the decoupled
weight-decay step.

Plain functions over lists of tensors, as ``torch.optim.adamw``'s functional core: the shell
gathers the blocks' updates ``u = P m`` and calls them once per step. None of them synchronises with
the host: a step found non-finite is masked on the device (``keep`` false: the updates become zero
and weight decay is left out), not decided by a Python ``if``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["all_finite", "apply_updates_", "guard_updates_"]


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """Whether every tensor is free of NaN and Inf: a 0-dim bool tensor on the first tensor's device
    (one ``_foreach_norm``; no host sync)."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    norms = torch._foreach_norm(list(tensors))
    return torch.stack([n.float().to(norms[0].device) for n in norms]).isfinite().all()


def guard_updates_(updates: Sequence[Tensor], max_rms: Sequence[float | None], keep: Tensor) -> None:
    """Scale every ``u`` in place by ``min(1, max_rms sqrt(n) / |u|)`` (its own limit; ``None``: no
    limit), and by zero where ``keep`` is false. One ``_foreach_norm`` for all; every update is
    multiplied (by exactly 1 where it is within its limit)."""
    if not updates:
        return
    limits = [math.inf if rms is None else rms * math.sqrt(u.numel()) for rms, u in zip(max_rms, updates)]
    norms = torch._foreach_norm(list(updates))
    device = norms[0].device
    norms = torch.stack([n.to(device=device, dtype=torch.float64) for n in norms])
    scales = (torch.tensor(limits, dtype=torch.float64, device=device) / norms.clamp_min(1e-30)).clamp(max=1.0)
    scales = scales * keep.to(device)
    for update, scale in zip(updates, scales.unbind()):
        update.mul_(scale.to(update.device))


def apply_updates_(pairs: Sequence[tuple[Tensor, Tensor]], lr: float, weight_decay: float, keep: Tensor) -> None:
    """``theta <- theta (1 - lr weight_decay) - lr u`` for every ``(theta, u)`` (``u`` cast to
    ``theta``'s dtype); where ``keep`` is false, no weight decay (the updates are zero already)."""
    if not pairs:
        return
    params = [p for p, _ in pairs]
    if weight_decay > 0:
        decay = torch.tensor(1.0 - lr * weight_decay, dtype=torch.float64, device=keep.device)
        torch._foreach_mul_(params, torch.where(keep, decay, 1.0).to(params[0].device))
    torch._foreach_add_(params, [u.to(p.dtype) for p, u in pairs], alpha=-lr)
