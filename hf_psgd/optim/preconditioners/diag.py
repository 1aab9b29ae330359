"""Diag: ``Q = diag(q)`` with one positive entry per parameter element (Jacobi / "Newton-diag").

Fit on the group of positive diagonal matrices, which is a direct product of one-dimensional
groups, so every element takes its own normalised step: with ``a = q h`` and ``b = v / q`` the
relative gradient of ``E[h^T P h + v^T P^{-1} v]`` is ``a^2 - b^2`` (elementwise), its curvature
bound ``a^2 + b^2``, and ``q <- q (1 - mu (a^2 - b^2) / (a^2 + b^2))``. The step's expectation
vanishes exactly where ``E[a^2] = E[b^2]`` whenever ``(h_i, v_i)`` is jointly Gaussian with zero
mean (exact ``H v`` for any ``H``; whitening of zero-mean Gaussian gradients), so ``P = q^2`` tends
to ``diag(H^2)^{-1/2}`` (``|H|^{-1}`` for a diagonal ``H``) or to ``E[g^2]^{-1/2}``. Elements with
small curvature converge as fast as large ones, unlike a single tensor-wide bound. ``P g = q^2 g``
is computed on the fly: the state is one tensor the size of the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..linalg import work_dtype
from .base import Preconditioner, finite_sums, register_preconditioner

__all__ = ["Diag"]


@register_preconditioner
class Diag(Preconditioner):
    """Elementwise diagonal preconditioner (see the module docstring)."""

    name = "diag"
    state_keys = ("q",)
    scope = "tensor"

    @classmethod
    def init_state(
        cls, shape: torch.Size, options: Mapping[str, Any], dtype: torch.dtype, device: torch.device
    ) -> dict[str, Any]:
        return {"q": torch.ones(shape, dtype=dtype, device=device)}

    @classmethod
    def cost(cls, shape: torch.Size, options: Mapping[str, Any]) -> tuple[float, float]:
        return float(shape.numel()), 10.0 * shape.numel()

    @classmethod
    def set_scale(cls, state: dict[str, Any], scale: Tensor) -> None:
        state["q"].fill_(scale)

    @classmethod
    def update(cls, state: dict[str, Any], v: Tensor, h: Tensor, options: Mapping[str, Any]) -> None:
        state["q"].copy_(cls._fitted([state], [v], [h], options)[0])

    @classmethod
    def update_checked_many(
        cls,
        states: Sequence[dict[str, Any]],
        vs: Sequence[Tensor | None],
        hs: Sequence[Tensor],
        options: Mapping[str, Any],
        accept: Sequence[Tensor],
    ) -> list[Tensor]:
        """Every block's fit in multi-tensor operations, written where its ``accept`` is true and its new
        ``q`` is finite (:func:`~.base.finite_sums`)."""
        kept = []
        for state, ok, new in zip(states, accept, cls._fitted(states, vs, hs, options)):
            stored = state["q"]
            ok = ok & finite_sums(new)
            torch.where(ok, new.to(stored.dtype), stored, out=stored)
            kept.append(ok)
        return kept

    @classmethod
    def _fitted(
        cls, states: Sequence[dict[str, Any]], vs: Sequence[Tensor], hs: Sequence[Tensor], options: Mapping[str, Any]
    ) -> list[Tensor]:
        """The new ``q`` of every block (work dtype; the states unchanged):
        ``q - mu q (a^2 - b^2) / max(a^2 + b^2, tiny)`` with ``a = q h``, ``b = v / q``."""
        qs = [state["q"].to(work_dtype(state["q"].dtype)) for state in states]
        a2 = torch._foreach_mul(qs, list(hs))
        torch._foreach_mul_(a2, a2)
        b2 = torch._foreach_div(list(vs), qs)
        torch._foreach_mul_(b2, b2)
        bound = torch._foreach_add(a2, b2)
        torch._foreach_clamp_min_(bound, torch.finfo(qs[0].dtype).tiny)
        torch._foreach_sub_(a2, b2)
        torch._foreach_div_(a2, bound)
        torch._foreach_mul_(a2, qs)
        torch._foreach_mul_(a2, options["precond_lr"])
        return torch._foreach_sub(qs, a2)

    @classmethod
    def precondition(cls, state: dict[str, Any], g: Tensor) -> Tensor:
        q = state["q"].to(work_dtype(state["q"].dtype))
        return g * q * q

    @classmethod
    def precondition_many(cls, states: Sequence[dict[str, Any]], gs: Sequence[Tensor]) -> list[Tensor]:
        """``g q q`` of every block in two multi-tensor products (equal to one block at a time)."""
        qs = [state["q"].to(work_dtype(state["q"].dtype)) for state in states]
        if any(g.dtype != q.dtype or g.device != q.device for g, q in zip(gs, qs)):
            return super().precondition_many(states, gs)
        products = torch._foreach_mul(list(gs), qs)
        torch._foreach_mul_(products, qs)
        return products

    @classmethod
    def mean_diagonal(cls, state: dict[str, Any]) -> Tensor:
        return state["q"].float().square().mean()
