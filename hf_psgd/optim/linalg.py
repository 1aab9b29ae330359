"""Shared math for the preconditioner families.

Conventions: a tensor ``x`` of shape ``(n_0, ..., n_{k-1})`` is seen along one of its dims ``i``
as a "row matrix" ``to_rows(x, i)`` of shape ``(N / n_i, n_i)``: every row is one fibre of ``x``
along dim ``i``. Applying a matrix ``M`` (``n_i x n_i``) along dim ``i`` means replacing every fibre
``f`` by ``M f``, i.e. ``rows @ M.T``. A 1-D "factor" ``q`` is a diagonal matrix stored as its
diagonal.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "apply_along",
    "broadcast_along",
    "from_rows",
    "gram_along",
    "largest_eigenvalue_2x2",
    "power_of_two_scale",
    "procrustes_step3_",
    "procrustes_step_",
    "solve_transpose_along",
    "spd_norm_lower_bound",
    "to_rows",
    "work_dtype",
]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the preconditioner math runs in: at least float32 (bf16/fp16 state is lifted)."""
    return torch.promote_types(dtype, torch.float32)


def to_rows(x: Tensor, dim: int) -> Tensor:
    """``x`` with ``dim`` moved last, flattened to ``(N / n_dim, n_dim)`` (a view when possible)."""
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def from_rows(rows: Tensor, shape: torch.Size, dim: int) -> Tensor:
    """Inverse of :func:`to_rows` for a tensor of the given ``shape``."""
    moved = list(shape)
    moved.append(moved.pop(dim))
    return rows.reshape(moved).movedim(-1, dim)


def broadcast_along(q: Tensor, ndim: int, dim: int) -> Tensor:
    """A diagonal factor (length ``n``) viewed to broadcast along ``dim`` of an ``ndim``-dim tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return q.view(shape)


def apply_along(x: Tensor, factor: Tensor, dim: int, batch: int = 0) -> Tensor:
    """``factor`` applied along ``dim`` of ``x``: ``M f`` for every fibre ``f`` (diagonal if 1-D).

    With ``batch`` leading dims, ``x`` (``(B.., *shape)``) and ``factor`` (``(B.., n, n)`` or
    ``(B.., n)``) are stacks of as many independent pairs and ``dim`` counts after the batch dims: one
    batched product, equal to the pairs' products one at a time."""
    axis = dim + batch
    if factor.ndim == batch + 1:
        shape = [*x.shape[:batch], *[1] * (x.ndim - batch)]
        shape[axis] = -1
        return x * factor.view(shape)
    moved = x.movedim(axis, -1)
    rows = moved.reshape(*x.shape[:batch], -1, x.shape[axis])
    return (rows @ factor.mT).reshape(moved.shape).movedim(-1, axis)


def solve_transpose_along(x: Tensor, factor: Tensor, dim: int) -> Tensor:
    """``factor^{-T}`` applied along ``dim`` of ``x``; a 2-D factor must be upper triangular.

    With rows ``R = to_rows(x, dim)`` the result's rows are ``R Q^{-1}`` (a right triangular solve),
    which is ``Q^{-T} f`` for every fibre ``f``.
    """
    if factor.ndim == 1:
        return x / broadcast_along(factor, x.ndim, dim)
    rows = torch.linalg.solve_triangular(factor, to_rows(x, dim), upper=True, left=False)
    return from_rows(rows, x.shape, dim)


def gram_along(x: Tensor, dim: int, diagonal: bool) -> Tensor:
    """``sum over fibres f along dim of f f^T``: ``n x n``, or its diagonal (length ``n``) when
    ``diagonal`` is true."""
    if diagonal:
        other = [d for d in range(x.ndim) if d != dim]
        return x.square().sum(dim=other) if other else x.square()
    rows = to_rows(x, dim)
    return rows.mT @ rows


def power_of_two_scale(x: Tensor) -> Tensor:
    """``2^-k`` (0-dim, ``x``'s dtype) with ``2^k`` near ``max |x|`` (1 for an all-zero or
    non-finite ``x``): scaling by it is exact, and squares and products of the scaled entries
    cannot overflow. No host synchronisation."""
    peak = x.detach().abs().amax()
    exponent = torch.frexp(peak).exponent.clamp_min(-120)  # 2^120 is finite in every work dtype
    ok = peak.isfinite() & (peak > 0)
    return torch.where(ok, torch.ldexp(torch.ones_like(peak), -exponent), torch.ones_like(peak))


def spd_norm_lower_bound(a: Tensor) -> Tensor:
    """A cheap lower bound of the spectral norm of a symmetric positive semi-definite matrix.

    One power-iteration step from the row ``x = A e_j`` of largest norm: ``|A x| / |x|``. For PSD
    ``A`` this is at least ``|A e_j|`` and at most ``|A|_2`` (still a lower bound for any square ``A``).
    Computed on ``A`` scaled by a power of two (exact), so every finite ``A`` gives a finite bound. No
    host synchronisation.
    """
    scale = power_of_two_scale(a)
    a = a * scale
    row_norms = a.square().sum(dim=1)
    x = a.index_select(0, row_norms.argmax().view(1))
    ax = x @ a
    return ax.norm() / x.norm().clamp_min(torch.finfo(a.dtype).tiny) / scale


def largest_eigenvalue_2x2(alpha: Tensor, beta: Tensor, gamma: Tensor) -> Tensor:
    """Largest eigenvalue of the symmetric ``[[alpha, gamma], [gamma, beta]]`` (elementwise).

    For ``X = [a, b]`` (``n x 2``) the nonzero eigenvalues of ``a a^T + b b^T = X X^T`` are those of
    ``X^T X``, so ``alpha = |a|^2, beta = |b|^2, gamma = a . b`` give the exact spectral norm of the
    rank-2 matrix ``a a^T + b b^T`` in ``O(n)``.
    """
    return (alpha + beta).mul_(0.5).add_(torch.hypot((alpha - beta).mul_(0.5), gamma))


def procrustes_step_(q: Tensor, max_step: float = 0.125) -> None:
    """One online step of the orthogonal Procrustes problem ``min_U |U Q - I|_F`` over rotations, in place.

    ``Q <- U Q`` with ``U = exp(a R) ~ I + a R + (a R)^2 / 2``, ``R = Q^T - Q`` normalised by a lower
    bound of its norm and ``a <= max_step`` (line search where ``tr(R^2 Q) < 0``): ``Q^T Q`` is kept up
    to ``|a R|^4 / 4`` while ``Q`` moves towards the symmetric positive definite root of ``Q^T Q``
    (Li's psgd_torch, ``procrustes_step2``). Matrix products only; no host synchronisation.
    """
    r = _rotation_generator(q)
    rq = r @ q
    rrq = r @ rq
    trace_rq, trace_rrq = rq.diagonal().sum(), rrq.diagonal().sum()
    line_search = (-trace_rq / trace_rrq.clamp_max(-torch.finfo(q.dtype).tiny)).clamp_max(max_step)
    a = torch.where(trace_rrq < 0, line_search, torch.full_like(trace_rq, max_step))
    q.add_(rrq.mul_(0.5 * a).add_(rq).mul_(a))


def procrustes_step3_(q: Tensor, max_step: float = 1 / 3) -> None:
    """One third-order step of the online orthogonal Procrustes problem ``min_U |U Q - I|_F``, in place.

    ``Q <- U Q`` with ``U ~ I + a R + (a R)^2 / 2 + (a R)^3 / 8`` (``|U^T U - I| <= |a R|^6 / 64``; not
    the Taylor series), ``R = Q^T - Q`` normalised by a lower bound of its norm and ``a`` the larger root
    of ``d tr(U Q) / da = tr(R Q) + a tr(R^2 Q) + (3 / 8) a^2 tr(R^3 Q)``, at most ``max_step``; no step
    unless ``tr(R Q) > 0`` and ``tr(R^3 Q) < 0`` (else ``Q`` is symmetric to rounding). ``Q`` moves
    towards the symmetric positive definite factor ``(Q^T Q)^{1/2}`` of its polar decomposition (Li's
    psgd_torch, ``procrustes_step3``). Matrix products only; no host synchronisation.
    """
    r = _rotation_generator(q)
    rq = r @ q
    rrq = r @ rq
    rrrq = r @ rrq
    t1, t2, t3 = (m.diagonal().sum() for m in (rq, rrq, rrrq))
    root = (-t2 - (t2.square() - 1.5 * t1 * t3).sqrt()) / (0.75 * t3)  # finite where it is taken
    a = torch.where((t1 > 0) & (t3 < 0), root.clamp_max(max_step), torch.zeros_like(t1))
    q.add_(rrrq.mul_(0.25 * a).add_(rrq).mul_(0.5 * a).add_(rq).mul_(a))


def _rotation_generator(q: Tensor) -> Tensor:
    """``R = Q^T - Q`` (skew) over a lower bound of its norm: the direction of the Procrustes rotations."""
    r = q.mT - q
    return r / spd_norm_lower_bound(r).clamp_min(torch.finfo(q.dtype).tiny)
