"""LRA: ``Q = (I + U V^T) diag(d)`` over the whole flattened param group (low-rank approximation).

``d`` has ``n`` entries, ``U, V`` are ``n x r`` (``r = min(rank, n)``; ``rank=0`` is a diagonal
preconditioner). ``P = Q^T Q`` is a diagonal scaling plus a rank-``2r`` correction: it can match
``|H|^{-1}`` on ``r`` outlying directions of the curvature and a diagonal elsewhere. With
``M = I + U V^T``: ``M x = x + U (V^T x)``, and by the Woodbury identity
``M^{-1} x = x - U K^{-1} V^T x``, ``M^{-T} y = y - V K^{-T} U^T y`` with ``K = I_r + V^T U`` (one
``r x r`` LU factorisation), so fits and ``P g = d M^T M (d g)`` cost ``O(n r + r^3)``.

Fit (Li 2022, "black box Lie group preconditioners"), with ``a = Q h``, ``b = Q^{-T} v``, ``E = a a^T
- b b^T`` the relative gradient of ``E[h^T P h + v^T P^{-1} v]``, three Lie groups:

* ``d`` on the positive diagonal group acting on the right (``Q <- Q (I - diag(delta))``), a
  direct product of one-dimensional groups: the gradient ``h (P h) - v (P^{-1} v)`` is normalised
  per element, as in Diag, by ``sqrt((P h)^2 + v^2) sqrt(h^2 + (P^{-1} v)^2) >= |h (P h)| +
  |v (P^{-1} v)|`` (exactly Diag's ``(d h)^2 + (v / d)^2`` when ``U V^T = 0``, so ``rank=0`` is Diag),
  and every ``d_i`` moves by a factor in ``[1 - mu, 1 + mu]``;
* ``U`` with ``V`` fixed: ``{I + X V^T}`` is a group; ``Q <- (I - mu E V V^T) Q`` is
  ``U <- U - mu E V (I + V^T U)``, normalised by ``|a| |V V^T a| + |b| |V V^T b|``
  (``>= |(a a^T + b b^T) V V^T|``);
* ``V`` with ``U`` fixed, symmetrically: ``V <- V - mu (I + V U^T) E U``, normalised by
  ``|a| |U U^T a| + |b| |U U^T b|``.

``mu = precond_lr``, divided for ``U`` and ``V`` by their own running bound ``L`` (``lipschitz_beta``).
``U`` and ``V`` take turns (``V`` first). ``Q`` starts exactly at ``scale I``: ``U`` random (fixed
by the ``seed`` option), ``V = 0``. After each fit ``U`` and ``V`` are rescaled to equal norms
(``U V^T`` unchanged), which keeps them well conditioned. A fit with a non-finite result (``I + U V^T``
numerically singular, possible at ``precond_lr = 1``) leaves the state as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..linalg import work_dtype
from ..validation import FamilyOptions, check, is_int
from .base import Preconditioner, register_preconditioner, update_lipschitz

__all__ = ["LRA", "LRAOptions"]


def _plus_low_rank(left: Tensor, right: Tensor, x: Tensor) -> Tensor:
    """``(I + left right^T) x``."""
    return x + left @ (right.mT @ x)


def _bound(x: Tensor, y: Tensor, factor: Tensor) -> Tensor:
    """``|x| |F F^T x| + |y| |F F^T y|`` for ``F = factor``."""
    return x.norm() * (factor @ (factor.mT @ x)).norm() + y.norm() * (factor @ (factor.mT @ y)).norm()


@dataclass(frozen=True)
class LRAOptions(FamilyOptions):
    """``rank``: the rank of ``U`` and ``V`` (0: a diagonal preconditioner)."""

    rank: int = 10

    def validate(self) -> None:
        check("rank", self.rank, is_int(self.rank) and self.rank >= 0, "an int >= 0 (0: diagonal)")


@register_preconditioner
class LRA(Preconditioner):
    """Diagonal plus low-rank preconditioner over the whole param group (see the module docstring)."""

    name = "lra"
    state_keys = ("d", "U", "V", "lipschitz")
    scope = "group"
    clips_whitened_updates = True
    options = LRAOptions

    @classmethod
    def init_state(
        cls, shape: torch.Size, options: Mapping[str, Any], dtype: torch.dtype, device: torch.device
    ) -> dict[str, Any]:
        n = shape.numel()
        rank = min(options["rank"], n)
        generator = torch.Generator().manual_seed(options["seed"])
        u = torch.randn(n, rank, generator=generator, dtype=work_dtype(dtype)) / n**0.5
        return {
            "d": torch.ones(n, dtype=dtype, device=device),
            "U": u.to(dtype=dtype, device=device),
            "V": torch.zeros(n, rank, dtype=dtype, device=device),
            "lipschitz": torch.zeros(2, dtype=work_dtype(dtype), device=device),
            "fit_V_next": True,
        }

    @classmethod
    def cost(cls, shape: torch.Size, options: Mapping[str, Any]) -> tuple[float, float]:
        n = shape.numel()
        rank = min(options["rank"], n)
        return float(n * (2 * rank + 1)), 20.0 * n * rank + 10.0 * n

    @classmethod
    def set_scale(cls, state: dict[str, Any], scale: Tensor) -> None:
        state["d"].fill_(scale)
        state["V"].zero_()
        state["fit_V_next"] = True

    @classmethod
    def update(cls, state: dict[str, Any], v: Tensor, h: Tensor, options: Mapping[str, Any]) -> None:
        d, u, w = (state[key].to(work_dtype(state[key].dtype)) for key in ("d", "U", "V"))
        h = h.reshape(-1, 1).to(d.dtype)
        v = v.reshape(-1, 1).to(d.dtype)
        d = d.unsqueeze(1)
        k = torch.eye(u.shape[1], dtype=d.dtype, device=d.device) + w.mT @ u
        a = _plus_low_rank(u, w, d * h)  # Q h
        p_h = d * _plus_low_rank(w, u, a)  # P h
        b = v / d
        if u.shape[1]:
            lu, pivots, _ = torch.linalg.lu_factor_ex(k)  # a singular K shows as non-finite results
            b = b - w @ torch.linalg.lu_solve(lu, pivots, u.mT @ b, adjoint=True)  # Q^{-T} v
            inverse_p_v = b - u @ torch.linalg.lu_solve(lu, pivots, w.mT @ b)
        else:
            inverse_p_v = b
        inverse_p_v = inverse_p_v / d  # P^{-1} v

        tiny = torch.finfo(d.dtype).tiny
        lipschitz, mu, beta = state["lipschitz"].clone(), options["precond_lr"], options["lipschitz_beta"]
        grad_d = h * p_h - v * inverse_p_v
        bound_d = (p_h.square() + v.square()).sqrt_().mul_((h.square() + inverse_p_v.square()).sqrt_())
        new_d = d - grad_d.div_(bound_d.clamp_min_(tiny)).mul_(d).mul_(mu)

        if u.shape[1]:
            if state["fit_V_next"]:
                grad = a @ (a.mT @ u) - b @ (b.mT @ u)  # E U
                step = mu / update_lipschitz(lipschitz[1], _bound(a, b, u), beta).clamp_min(tiny)
                w = w - _plus_low_rank(w, u, grad).mul_(step)
            else:
                grad = a @ (a.mT @ w) - b @ (b.mT @ w)  # E V
                step = mu / update_lipschitz(lipschitz[0], _bound(a, b, w), beta).clamp_min(tiny)
                u = u - (grad @ k).mul_(step)
            state["fit_V_next"] = not state["fit_V_next"]
            norm_u, norm_w = u.norm(), w.norm()
            balance = torch.where((norm_u > 0) & (norm_w > 0), (norm_u / norm_w.clamp_min(tiny)).sqrt(), 1.0)
            u, w = u / balance, w * balance
        fitted = {"d": new_d.squeeze(1), "U": u, "V": w, "lipschitz": lipschitz}
        finite = torch.stack([t.isfinite().all() for t in fitted.values()]).all()
        for key, value in fitted.items():
            state[key].copy_(torch.where(finite, value, state[key]))

    @classmethod
    def precondition(cls, state: dict[str, Any], g: Tensor) -> Tensor:
        d, u, w = (state[key].to(work_dtype(state[key].dtype)) for key in ("d", "U", "V"))
        x = g.reshape(-1, 1).to(d.dtype)
        d = d.unsqueeze(1)
        return (d * _plus_low_rank(w, u, _plus_low_rank(u, w, d * x))).reshape(g.shape)

    @classmethod
    def mean_diagonal(cls, state: dict[str, Any]) -> Tensor:
        d, u, w = (state[key].float() for key in ("d", "U", "V"))
        column_norms = 1 + 2 * (u * w).sum(1) + ((w @ (u.mT @ u)) * w).sum(1)  # |M e_i|^2
        return (d.square() * column_norms).mean()
