"""Dense: one full upper-triangular ``Q`` (``n x n``) over the whole flattened param group.

The paper's "Newton" preconditioner: ``P = Q^T Q`` can represent any SPD matrix, so with exact
``H v`` it tends to ``|H|^{-1}`` (a Newton-type step that also handles indefinite ``H``). For small
problems only: ``n^2`` numbers of state; groups with more than ``max_dense_size`` parameters are
refused with a ``ValueError`` (raise the option to allow them).

Fit on the group of upper-triangular matrices with positive diagonal (Li 2015/2018, "EQ"): with
``a = Q h`` and ``b = Q^{-T} v`` (one triangular solve) the relative gradient of
``E[h^T P h + v^T P^{-1} v]`` is ``a a^T - b b^T``, its projection on the group's Lie algebra
``triu(a a^T - b b^T)``, and ``Q <- Q - (mu / L) triu(a a^T - b b^T) Q``. ``L`` tracks the exact
spectral norm of ``a a^T + b b^T`` (a rank-2 matrix: the largest eigenvalue of its 2 x 2 Gram
matrix), so ``mu = precond_lr`` is dimensionless. ``triu(a a^T) Q = a * revcumsum(a * Q)`` (row
``i`` sums rows ``j >= i``) costs ``O(n^2)``, so a fit costs ``O(n^2)`` like ``P g = Q^T (Q g)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..linalg import largest_eigenvalue_2x2, work_dtype
from ..validation import FamilyOptions, check, is_int
from .base import Preconditioner, register_preconditioner, update_lipschitz

__all__ = ["Dense", "DenseOptions"]


def _triu_outer_times(a: Tensor, q: Tensor) -> Tensor:
    """``triu(a a^T) Q`` in ``O(n^2)``: row ``i`` is ``a_i sum_{j >= i} a_j Q_j``."""
    weighted = a.unsqueeze(1) * q
    return weighted.flip(0).cumsum(0).flip(0).mul_(a.unsqueeze(1))


@dataclass(frozen=True)
class DenseOptions(FamilyOptions):
    """``max_dense_size``: the largest param group (in parameters) that gets an ``n x n`` ``Q``."""

    max_dense_size: int = 8192

    def validate(self) -> None:
        size = self.max_dense_size
        check("max_dense_size", size, is_int(size) and size >= 0, "an int >= 0")


@register_preconditioner
class Dense(Preconditioner):
    """Full upper-triangular preconditioner over the whole param group (see the module docstring)."""

    name = "dense"
    state_keys = ("Q", "lipschitz")
    scope = "group"
    options = DenseOptions

    @classmethod
    def init_state(
        cls, shape: torch.Size, options: Mapping[str, Any], dtype: torch.dtype, device: torch.device
    ) -> dict[str, Any]:
        n = shape.numel()
        limit = options["max_dense_size"]
        if n > limit:
            raise ValueError(
                f"preconditioner='dense' needs an n x n matrix for this param group of n={n} parameters, "
                f"above max_dense_size={limit}; raise it (PSGD(..., max_dense_size={n}); memory and time grow "
                "as n^2) or choose preconditioner='lra', 'xmat' or 'kron'"
            )
        return {
            "Q": torch.eye(n, dtype=dtype, device=device),
            "lipschitz": torch.zeros((), dtype=work_dtype(dtype), device=device),
        }

    @classmethod
    def cost(cls, shape: torch.Size, options: Mapping[str, Any]) -> tuple[float, float]:
        n = shape.numel()
        return float(n * n), 10.0 * n * n  # a fit and P g: a handful of n x n products and one triangular solve

    @classmethod
    def set_scale(cls, state: dict[str, Any], scale: Tensor) -> None:
        q = state["Q"]
        q.copy_(torch.eye(q.shape[0], dtype=q.dtype, device=q.device) * scale)

    @classmethod
    def update(cls, state: dict[str, Any], v: Tensor, h: Tensor, options: Mapping[str, Any]) -> None:
        stored = state["Q"]
        q = stored.to(work_dtype(stored.dtype))
        a = q @ h.reshape(-1).to(q.dtype)
        b = torch.linalg.solve_triangular(q, v.reshape(1, -1).to(q.dtype), upper=True, left=False).squeeze(0)
        bound = largest_eigenvalue_2x2(a.dot(a), b.dot(b), a.dot(b))
        step = options["precond_lr"] / update_lipschitz(state["lipschitz"], bound, options["lipschitz_beta"])
        q.sub_((_triu_outer_times(a, q) - _triu_outer_times(b, q)).mul_(step))
        if q is not stored:
            stored.copy_(q)

    @classmethod
    def precondition(cls, state: dict[str, Any], g: Tensor) -> Tensor:
        q = state["Q"].to(work_dtype(state["Q"].dtype))
        return (q.mT @ (q @ g.reshape(-1).to(q.dtype))).reshape(g.shape)

    @classmethod
    def mean_diagonal(cls, state: dict[str, Any]) -> Tensor:
        q = state["Q"].float()
        return q.square().sum() / q.shape[0]
