"""XMat: ``Q = diag(a) + antidiag(b)`` (X-shaped) over the whole flattened param group.

With ``J`` the flip (``J x = flip(x)``), ``antidiag(b) = diag(b) J``, so ``Q x = a x + b flip(x)``
and ``Q^T y = a y + flip(b y)``: ``P g = Q^T Q g`` costs ``O(n)``. X-shaped matrices form an algebra
that pairs element ``i`` with its mirror ``j = n - 1 - i``: ``Q`` is block diagonal with one 2 x 2
block ``[[a_i, b_i], [b_j, a_j]]`` per pair (and the 1 x 1 block ``a_c`` at the centre of an
odd-length vector, where ``b_c`` stays 0). The invertible ones form a group, a direct product of
``GL(2)``'s, and ``P = Q^T Q`` tends to ``|H|^{-1}`` wherever ``H`` itself is X-shaped.

Fit (Li 2022, "black box Lie group preconditioners"): with ``A = Q h`` and ``B = Q^{-T} v`` (each
2 x 2 block inverted in closed form) the relative gradient of ``E[h^T P h + v^T P^{-1} v]``
projected on the X-shaped algebra has diagonal ``A^2 - B^2`` and anti-diagonal
``A flip(A) - B flip(B)``; ``Q <- Q - mu E Q`` block by block, i.e.
``a <- a - mu (E_d a + E_x flip(b))``, ``b <- b - mu (E_d b + E_x flip(a))``. As in Diag every block
takes its own normalised step: ``mu = precond_lr / lambda_max(A_p A_p^T + B_p B_p^T)`` for the pair
``p`` (exact for a 2 x 2 block), so pairs of small curvature converge as fast as large ones; like
Diag it keeps no running bound (``lipschitz_beta`` does not apply).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..linalg import largest_eigenvalue_2x2, work_dtype
from .base import Preconditioner, register_preconditioner

__all__ = ["XMat"]


def _x_times(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """``(diag(a) + antidiag(b)) x``."""
    return a * x + b * x.flip(0)


def _x_transpose_times(a: Tensor, b: Tensor, y: Tensor) -> Tensor:
    """``(diag(a) + antidiag(b))^T y``."""
    return a * y + (b * y).flip(0)


def _x_inverse_transpose_times(a: Tensor, b: Tensor, v: Tensor) -> Tensor:
    """``(diag(a) + antidiag(b))^{-T} v``, each 2 x 2 block solved by Cramer's rule."""
    a_mirror, b_mirror = a.flip(0), b.flip(0)
    return (a_mirror * v - b_mirror * v.flip(0)) / (a * a_mirror - b * b_mirror)


@register_preconditioner
class XMat(Preconditioner):
    """X-shaped (diagonal plus anti-diagonal) preconditioner over the whole param group."""

    name = "xmat"
    state_keys = ("a", "b")
    scope = "group"
    clips_whitened_updates = True

    @classmethod
    def init_state(
        cls, shape: torch.Size, options: Mapping[str, Any], dtype: torch.dtype, device: torch.device
    ) -> dict[str, Any]:
        n = shape.numel()
        return {"a": torch.ones(n, dtype=dtype, device=device), "b": torch.zeros(n, dtype=dtype, device=device)}

    @classmethod
    def cost(cls, shape: torch.Size, options: Mapping[str, Any]) -> tuple[float, float]:
        return 2.0 * shape.numel(), 20.0 * shape.numel()

    @classmethod
    def set_scale(cls, state: dict[str, Any], scale: Tensor) -> None:
        state["a"].fill_(scale)
        state["b"].zero_()

    @classmethod
    def update(cls, state: dict[str, Any], v: Tensor, h: Tensor, options: Mapping[str, Any]) -> None:
        a_stored, b_stored = state["a"], state["b"]
        a, b = a_stored.to(work_dtype(a_stored.dtype)), b_stored.to(work_dtype(b_stored.dtype))
        big_a = _x_times(a, b, h.reshape(-1).to(a.dtype))
        big_b = _x_inverse_transpose_times(a, b, v.reshape(-1).to(a.dtype))
        grad_diagonal = big_a.square() - big_b.square()
        grad_anti = big_a * big_a.flip(0) - big_b * big_b.flip(0)
        sum_diagonal = big_a.square() + big_b.square()
        sum_anti = big_a * big_a.flip(0) + big_b * big_b.flip(0)
        n = a.numel()
        if n % 2:  # the centre is a 1 x 1 block: no anti-diagonal entry of its own
            grad_anti[n // 2] = 0
            sum_anti[n // 2] = 0
        bound = largest_eigenvalue_2x2(sum_diagonal, sum_diagonal.flip(0), sum_anti)
        step = options["precond_lr"] / bound.clamp_min_(torch.finfo(a.dtype).tiny)
        grad_diagonal.mul_(step)
        grad_anti.mul_(step)
        new_a = a - grad_diagonal * a - grad_anti * b.flip(0)
        new_b = b - grad_diagonal * b - grad_anti * a.flip(0)
        a_stored.copy_(new_a)
        b_stored.copy_(new_b)

    @classmethod
    def precondition(cls, state: dict[str, Any], g: Tensor) -> Tensor:
        a = state["a"].to(work_dtype(state["a"].dtype))
        b = state["b"].to(a.dtype)
        flat = g.reshape(-1).to(a.dtype)
        return _x_transpose_times(a, b, _x_times(a, b, flat)).reshape(g.shape)

    @classmethod
    def mean_diagonal(cls, state: dict[str, Any]) -> Tensor:
        return state["a"].float().square().mean() + state["b"].float().square().mean()
