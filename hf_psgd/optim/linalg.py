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
    "skew_norm_lower_bound",
    "solve_transpose_along",
    "spd_norm_lower_bound",
    "to_rows",
    "work_dtype",
]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the preconditioner math runs in: at least float32 (bf16/fp16 state is lifted)."""
    return torch.promote_types(dtype, torch.float32)


def to_rows(x: Tensor, dim: int, batch: int = 0) -> Tensor:
    """``x`` with ``dim`` moved last, flattened to ``(N / n_dim, n_dim)`` (a view when possible); with
    ``batch`` leading dims (kept) ``(B.., N / n_dim, n_dim)``, ``dim`` counted after them."""
    axis = dim + batch
    return x.movedim(axis, -1).reshape(*x.shape[:batch], -1, x.shape[axis])


def from_rows(rows: Tensor, shape: torch.Size, dim: int, batch: int = 0) -> Tensor:
    """Inverse of :func:`to_rows` for a tensor of the given ``shape`` (batch dims included)."""
    moved = list(shape)
    moved.append(moved.pop(dim + batch))
    return rows.reshape(moved).movedim(-1, dim + batch)


def broadcast_along(q: Tensor, ndim: int, dim: int, batch: int = 0) -> Tensor:
    """A diagonal factor (length ``n``; ``(B.., n)`` with ``batch`` leading dims) viewed to broadcast
    along ``dim`` (counted after the batch dims) of an ``ndim``-dim tensor (batch dims included)."""
    shape = [*q.shape[:batch], *[1] * (ndim - batch)]
    shape[dim + batch] = -1
    return q.view(shape)


def apply_along(x: Tensor, factor: Tensor, dim: int, batch: int = 0) -> Tensor:
    """``factor`` applied along ``dim`` of ``x``: ``M f`` for every fibre ``f`` (diagonal if 1-D).

    With ``batch`` leading dims, ``x`` (``(B.., *shape)``) and ``factor`` (``(B.., n, n)`` or
    ``(B.., n)``) are stacks of as many independent pairs and ``dim`` counts after the batch dims: one
    batched product, equal to the pairs' products one at a time."""
    if factor.ndim == batch + 1:
        return x * broadcast_along(factor, x.ndim, dim, batch)
    return from_rows(to_rows(x, dim, batch) @ factor.mT, x.shape, dim, batch)


def solve_transpose_along(x: Tensor, factor: Tensor, dim: int, batch: int = 0) -> Tensor:
    """``factor^{-T}`` applied along ``dim`` of ``x``; a dense factor must be upper triangular (with
    ``batch`` leading dims: stacks, as in :func:`apply_along`).

    With rows ``R = to_rows(x, dim)`` the result's rows are ``R Q^{-1}`` (a right triangular solve),
    which is ``Q^{-T} f`` for every fibre ``f``.
    """
    if factor.ndim == batch + 1:
        return x / broadcast_along(factor, x.ndim, dim, batch)
    rows = torch.linalg.solve_triangular(factor, to_rows(x, dim, batch), upper=True, left=False)
    return from_rows(rows, x.shape, dim, batch)


def gram_along(x: Tensor, dim: int, diagonal: bool, batch: int = 0) -> Tensor:
    """``sum over fibres f along dim of f f^T``: ``n x n``, or its diagonal (length ``n``) when
    ``diagonal`` is true. With ``batch`` leading dims, one Gram per stacked tensor (``(B.., n, n)`` or
    ``(B.., n)``), ``dim`` counted after the batch dims."""
    if diagonal:
        other = [d for d in range(batch, x.ndim) if d != dim + batch]
        return x.square().sum(dim=other) if other else x.square()
    rows = to_rows(x, dim, batch)
    return rows.mT @ rows


def power_of_two_scale(peak: Tensor) -> Tensor:
    """``2^-k`` (elementwise, ``peak``'s dtype) with ``2^k`` near ``peak`` (a matrix's largest magnitude;
    1 where ``peak`` is zero or not finite): scaling by it is exact, and squares and products of the
    scaled entries cannot overflow. No host synchronisation."""
    exponent = torch.frexp(peak).exponent.clamp_min(-120)  # 2^120 is finite in every work dtype
    ok = peak.isfinite() & (peak > 0)
    return torch.where(ok, torch.ldexp(torch.ones_like(peak), -exponent), torch.ones_like(peak))


def spd_norm_lower_bound(a: Tensor) -> Tensor:
    """A cheap lower bound of the spectral norm of a symmetric positive semi-definite matrix (one per
    matrix of a stack ``(B.., n, n)``): :func:`_norm_lower_bound` with the largest magnitude read from
    the diagonal (``|a_ij| <= sqrt(a_ii a_jj)``)."""
    return _norm_lower_bound(a, a.diagonal(dim1=-2, dim2=-1).amax(-1))


def skew_norm_lower_bound(r: Tensor) -> Tensor:
    """A cheap lower bound of the spectral norm of a skew-symmetric matrix (one per matrix of a stack):
    :func:`_norm_lower_bound` with the largest magnitude as the largest entry (``r_ji = -r_ij``)."""
    return _norm_lower_bound(r, r.flatten(-2).amax(-1))


def _norm_lower_bound(a: Tensor, peak: Tensor) -> Tensor:
    """One power-iteration step from the row ``x = A e_j`` of largest norm: ``|x A| / |x|``, at least
    ``|A e_j|`` for symmetric PSD ``A`` and at most ``|A|_2`` for any square ``A`` (``peak``: the largest
    magnitude of each matrix). The row is scaled by a power of two near ``1 / peak`` before it multiplies
    ``A`` (exact), so every finite ``A`` gives a finite bound. No host synchronisation."""
    scale = power_of_two_scale(peak)
    rows = torch.linalg.vector_norm(a, dim=-1).argmax(dim=-1, keepdim=True)
    x = a.gather(-2, rows.unsqueeze(-1).expand(*a.shape[:-2], 1, a.shape[-1])) * _per_matrix(scale)
    xa = (x * _per_matrix(scale)) @ a  # s^2 a_j A: every term of the sums at most 1 in magnitude
    tiny = torch.finfo(a.dtype).tiny
    return xa.flatten(-2).norm(dim=-1) / x.flatten(-2).norm(dim=-1).clamp_min(tiny) / scale


def _per_matrix(values: Tensor) -> Tensor:
    """One value per matrix of a stack (``(B..)``) viewed to broadcast over the matrices (``(B.., 1, 1)``)."""
    return values[..., None, None]


def _trace(m: Tensor) -> Tensor:
    """The trace of every matrix of a stack."""
    return m.diagonal(dim1=-2, dim2=-1).sum(-1)


def largest_eigenvalue_2x2(alpha: Tensor, beta: Tensor, gamma: Tensor) -> Tensor:
    """Largest eigenvalue of the symmetric ``[[alpha, gamma], [gamma, beta]]`` (elementwise).

    For ``X = [a, b]`` (``n x 2``) the nonzero eigenvalues of ``a a^T + b b^T = X X^T`` are those of
    ``X^T X``, so ``alpha = |a|^2, beta = |b|^2, gamma = a . b`` give the exact spectral norm of the
    rank-2 matrix ``a a^T + b b^T`` in ``O(n)``.
    """
    return (alpha + beta).mul_(0.5).add_(torch.hypot((alpha - beta).mul_(0.5), gamma))


def procrustes_step_(q: Tensor, max_step: float = 0.125) -> None:
    """One online step of the orthogonal Procrustes problem ``min_U |U Q - I|_F`` over rotations, in place
    (every matrix of a stack ``(B.., n, n)`` on its own).

    ``Q <- U Q`` with ``U = exp(a R) ~ I + a R + (a R)^2 / 2``, ``R = Q^T - Q`` normalised by a lower
    bound of its norm and ``a <= max_step`` (line search where ``tr(R^2 Q) < 0``): ``Q^T Q`` is kept up
    to ``|a R|^4 / 4`` while ``Q`` moves towards the symmetric positive definite root of ``Q^T Q``
    (Li's psgd_torch, ``procrustes_step2``). Matrix products only; no host synchronisation.
    """
    r = _rotation_generator(q)
    rq = r @ q
    rrq = r @ rq
    trace_rq, trace_rrq = _trace(rq), _trace(rrq)
    line_search = (-trace_rq / trace_rrq.clamp_max(-torch.finfo(q.dtype).tiny)).clamp_max(max_step)
    a = _per_matrix(torch.where(trace_rrq < 0, line_search, torch.full_like(trace_rq, max_step)))
    q.add_(rrq.mul_(0.5 * a).add_(rq).mul_(a))


def procrustes_step3_(q: Tensor, max_step: float = 1 / 3) -> None:
    """One third-order step of the online orthogonal Procrustes problem ``min_U |U Q - I|_F``, in place
    (every matrix of a stack on its own).

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
    t1, t2, t3 = (_trace(m) for m in (rq, rrq, rrrq))
    root = (-t2 - (t2.square() - 1.5 * t1 * t3).sqrt()) / (0.75 * t3)  # finite where it is taken
    a = _per_matrix(torch.where((t1 > 0) & (t3 < 0), root.clamp_max(max_step), torch.zeros_like(t1)))
    q.add_(rrrq.mul_(0.25 * a).add_(rrq).mul_(0.5 * a).add_(rq).mul_(a))


def _rotation_generator(q: Tensor) -> Tensor:
    """``R = Q^T - Q`` (skew) over a lower bound of its norm: the direction of the Procrustes rotations."""
    r = q.mT - q
    return r / _per_matrix(skew_norm_lower_bound(r).clamp_min(torch.finfo(q.dtype).tiny))
