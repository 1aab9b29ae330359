"""The parameter update: the non-finite check, the elementwise clip of whitened steps, the update-size guard
(with Adam's floor and, for Newton-type steps, the growth cap) and the decoupled weight-decay step.

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

__all__ = [
    "ADAM_BETA2",
    "UPDATE_RMS_BETA",
    "adam_floors",
    "all_finite",
    "apply_updates_",
    "clip_amplitudes_",
    "guard_scales",
    "tensor_norms",
]

#: EMA factor of the mean squared gradient behind :func:`adam_floors` (Adam's default ``beta2``)
ADAM_BETA2 = 0.999
#: EMA factor of a block's update RMS behind the growth cap of :func:`guard_scales`
UPDATE_RMS_BETA = 0.9


def all_finite(norms: Sequence[Tensor]) -> Tensor:
    """Whether every tensor whose 2-norm is in ``norms`` (:func:`tensor_norms`) is free of NaN and Inf
    (a NaN or Inf makes its norm non-finite): a 0-dim bool tensor on the first norm's device (no host
    sync)."""
    if not norms:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([n.float().to(norms[0].device) for n in norms]).isfinite().all()


def tensor_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
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


def adam_floors(
    energies: Sequence[Tensor], gradient_norms: Sequence[Tensor], directions: Sequence[Tensor], keep: Tensor
) -> list[Tensor]:
    """Adam's update RMS for every block: ``rms(m) / sqrt(v)`` with ``m`` the block's direction (its
    momentum) and ``v`` the bias-corrected EMA (:data:`ADAM_BETA2`) of its mean squared gradient (from
    ``gradient_norms``, the blocks' gradients' 2-norms): what Adam's step ``m / sqrt(v)`` would measure
    if ``v`` were one number per block. Whitening's step is much smaller than that where the gradient is
    consistent rather than noisy (fine-tuning: a rank-one gradient ``s`` is whitened to ``s / |s|``,
    RMS ``1 / sqrt(N)``), so the guard lifts an update to a fraction of it (:func:`guard_scales`).
    ``energies``: per block a ``(2,)`` tensor ``(EMA of mean g^2, EMA weight)``, moved in place where
    ``keep`` is true. No host synchronisation."""
    if not energies:
        return []
    device = energies[0].device
    sizes = [max(m.numel(), 1) for m in directions]
    mean_squares = torch.stack([n.to(device).square() / size for n, size in zip(gradient_norms, sizes)])
    rms = torch.stack([n.to(device) / math.sqrt(size) for n, size in zip(tensor_norms(directions), sizes)])
    stacked = torch.stack(list(energies))
    target = torch.stack([mean_squares, torch.ones_like(mean_squares)], dim=1).to(stacked.dtype)
    moved = torch.where(keep.to(device), torch.lerp(stacked, target, 1 - ADAM_BETA2), stacked)
    torch._foreach_copy_(list(energies), list(moved.unbind()))
    second_moment = moved[:, 0] / moved[:, 1].clamp_min(torch.finfo(moved.dtype).tiny)
    return list((rms / second_moment.sqrt().clamp_min(1e-30)).unbind())


def clip_amplitudes_(updates: Sequence[Tensor], limits: Sequence[float | None]) -> list[Tensor | None]:
    """Every element of each ``u`` clamped in place to ``[-a, a]`` (``a`` from ``limits``; ``None``: ``u``
    untouched); returns per ``u`` whether any element was beyond ``a`` (0-dim bool, no host sync; ``None``
    where untouched). A whitened step ``P m`` has an RMS of about 1, but where ``P`` grew to its damping bound
    (an element whose gradient vanished for many fits, e.g. the embedding row of an absent token, fitted
    elementwise by LRA's diagonal or XMat's pairs) one returning gradient gives elements far above it, and the guard's
    one factor per block (:func:`guard_scales`) would then shrink the whole block's step. One
    ``_foreach_norm`` (the largest magnitude) and two clamps per limit."""
    clipped: list[Tensor | None] = [None] * len(updates)
    by_limit: dict[float, list[int]] = {}
    for index, limit in enumerate(limits):
        if limit is not None:
            by_limit.setdefault(float(limit), []).append(index)
    for limit, members in by_limit.items():
        chosen = [updates[i] for i in members]
        for i, largest in zip(members, torch._foreach_norm(chosen, math.inf)):
            clipped[i] = largest > limit
        torch._foreach_clamp_min_(chosen, -limit)
        torch._foreach_clamp_max_(chosen, limit)
    return clipped


def guard_scales(
    updates: Sequence[Tensor],
    max_rms: Sequence[float | None],
    keep: Tensor,
    floors: Sequence[Tensor | None] = (),
    growth: Sequence[tuple[Tensor, float] | None] = (),
) -> list[Tensor]:
    """The guard's factor of every ``u``: its RMS moved into ``[floor, cap]`` (``floors``: the lowest RMS,
    ``adam_floor`` times :func:`adam_floors`', or ``None``; the cap wins), zero where ``keep`` is false; 0-dim
    tensors on the updates' device. The cap is the smaller of ``max_rms`` (``None``: none) and, where ``growth``
    gives a block's ``(history, factor)``, ``factor`` times the EMA (:data:`UPDATE_RMS_BETA`) of the block's
    earlier guarded update RMS: ``history`` is ``(EMA, started)``, started at the first nonzero guarded RMS
    and moved in place by each nonzero one where ``keep`` is true (no cap before the first; a zero update, e.g.
    LoRA's first steps, neither starts nor lowers it, so it never pins a block at zero). Newton-type updates
    (``P ~ |H|^-1``) grow without bound where the curvature vanishes, so one gradient spike there moves
    the parameters far; the growth cap lets a step at most ``factor`` times the recent ones. One
    ``_foreach_norm`` per dtype (in at least float32); applied with the parameter update
    (:func:`apply_updates_`). No host synchronisation."""
    if not updates:
        return []
    limits = [math.inf if rms is None else rms * math.sqrt(u.numel()) for rms, u in zip(max_rms, updates)]
    norms = tensor_norms(updates)
    device = norms[0].device
    norms = torch.stack([n.to(device=device, dtype=torch.float64) for n in norms])
    zero = torch.zeros((), dtype=torch.float64, device=device)
    floors = floors or [None] * len(updates)
    lows = [zero if f is None else f.to(device, torch.float64) * math.sqrt(u.numel()) for f, u in zip(floors, updates)]
    caps = torch.tensor(limits, dtype=torch.float64, device=device)
    grown = [i for i, g in enumerate(growth) if g is not None]
    if grown:
        histories = torch.stack([growth[i][0].to(device, torch.float64) for i in grown])
        sizes = torch.tensor([math.sqrt(updates[i].numel()) for i in grown], dtype=torch.float64, device=device)
        factors = torch.tensor([growth[i][1] for i in grown], dtype=torch.float64, device=device)
        growth_caps = torch.where(histories[:, 1] > 0, factors * histories[:, 0] * sizes, math.inf)
        caps[grown] = torch.minimum(caps[grown], growth_caps)
    targets = torch.minimum(torch.maximum(norms, torch.stack(lows)), caps)
    if grown:
        rms = targets[grown] / sizes
        target = torch.stack([rms, torch.ones_like(rms)], dim=1)
        started = torch.where(histories[:, 1:] > 0, torch.lerp(histories, target, 1 - UPDATE_RMS_BETA), target)
        moved = torch.where((keep.to(device) & (rms > 0))[:, None], started, histories)
        torch._foreach_copy_([growth[i][0] for i in grown], [m.to(growth[i][0].dtype) for i, m in zip(grown, moved)])
    scales = targets / norms.clamp_min(1e-30) * keep.to(device)
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
