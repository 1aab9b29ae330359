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

__all__ = ["all_finite", "apply_updates_", "guard_scales"]


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """Whether every tensor is free of NaN and Inf: a 0-dim bool tensor on the first tensor's device
    (one ``_foreach_norm``; no host sync)."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    norms = torch._foreach_norm(list(tensors))
    return torch.stack([n.float().to(norms[0].device) for n in norms]).isfinite().all()


def _norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The 2-norm of every tensor, accumulated and returned in at least float32 (one ``_foreach_norm``
    per dtype)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(index)
    norms: list[Tensor] = list(tensors)
    for dtype, members in by_dtype.items():
        found = torch._foreach_norm([tensors[i] for i in members], 2, dtype=torch.promote_types(dtype, torch.float32))
        for i, norm in zip(members, found):
            norms[i] = norm
    return norms


def guard_scales(updates: Sequence[Tensor], max_rms: Sequence[float | None], keep: Tensor) -> list[Tensor]:
    """The guard's factor of every ``u``: ``min(1, max_rms sqrt(n) / |u|)`` (its own limit; ``None``: no
    limit), zero where ``keep`` is false; 0-dim tensors on the updates' device. One ``_foreach_norm``
    per dtype (in at least float32); applied with the parameter update (:func:`apply_updates_`)."""
    if not updates:
        return []
    limits = [math.inf if rms is None else rms * math.sqrt(u.numel()) for rms, u in zip(max_rms, updates)]
    norms = _norms(updates)
    device = norms[0].device
    norms = torch.stack([n.to(device=device, dtype=torch.float64) for n in norms])
    scales = (torch.tensor(limits, dtype=torch.float64, device=device) / norms.clamp_min(1e-30)).clamp(max=1.0)
    scales = scales * keep.to(device)
    return [scale.to(update.device) for update, scale in zip(updates, scales.unbind())]


def apply_updates_(
    triples: Sequence[tuple[Tensor, Tensor, Tensor]], lr: float, weight_decay: float, keep: Tensor
) -> None:
    """``theta <- theta (1 - lr weight_decay) - lr s u`` for every ``(theta, u, s)`` (``s`` the guard's
    0-dim factor; one multi-tensor ``addcmul`` into ``theta``'s dtype, whatever ``u``'s); where ``keep``
    is false, no weight decay (``s`` is zero already)."""
    if not triples:
        return
    params = [p for p, _, _ in triples]
    if weight_decay > 0:
        decay = torch.tensor(1.0 - lr * weight_decay, dtype=torch.float64, device=keep.device)
        torch._foreach_mul_(params, torch.where(keep, decay, 1.0).to(params[0].device))
    torch._foreach_addcmul_(params, [u for _, u, _ in triples], [s for _, _, s in triples], value=-lr)
