"""The parameter update: the update-size guard and the decoupled weight-decay step.

Plain functions over lists of tensors, as ``torch.optim.adamw``'s functional core: the shell
gathers the blocks' updates ``u = P m`` and calls them once per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["all_finite", "apply_updates_", "clip_update_rms_"]


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every tensor is free of NaN and Inf (one ``_foreach_norm``; one host sync)."""
    if not tensors:
        return True
    norms = torch._foreach_norm(list(tensors))
    return bool(torch.stack([n.float().to(norms[0].device) for n in norms]).isfinite().all())


def clip_update_rms_(updates: Sequence[Tensor], max_rms: Sequence[float]) -> None:
    """Scale every ``u`` down in place to RMS ``<= max_rms`` (its own limit). One ``_foreach_norm``
    for all; on the CPU only the updates above their limit are touched (elsewhere every one is
    multiplied, which avoids a host sync)."""
    if not updates:
        return
    limits = [rms * math.sqrt(u.numel()) for rms, u in zip(max_rms, updates)]
    norms = torch._foreach_norm(list(updates))
    device = norms[0].device
    norms = torch.stack([n.to(device=device, dtype=torch.float64) for n in norms])
    scales = (torch.tensor(limits, dtype=torch.float64, device=device) / norms.clamp_min(1e-30)).clamp(max=1.0)
    if device.type == "cpu":
        for update, scale in zip(updates, scales.tolist()):
            if scale < 1.0:
                update.mul_(scale)
    else:
        for update, scale in zip(updates, scales.unbind()):
            update.mul_(scale.to(update.device))


def apply_updates_(pairs: Sequence[tuple[Tensor, Tensor]], lr: float, weight_decay: float) -> None:
    """``theta <- theta (1 - lr weight_decay) - lr u`` for every ``(theta, u)`` (``u`` cast to ``theta``'s dtype)."""
    if not pairs:
        return
    params = [p for p, _ in pairs]
    if weight_decay > 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, [u.to(p.dtype) for p, u in pairs], alpha=-lr)
