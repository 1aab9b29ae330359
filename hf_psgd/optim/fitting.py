"""One fit of a block's preconditioner on a pair ``(v, h)``, with the initial scale and damping.

``Q`` starts as ``scale I`` with ``scale = (mean v^2)^{1/4} (mean h^4)^{-1/8}`` from the first pair
(``(mean h^4)^{-1/8}`` when the family integrates the probe out), so that ``P h`` and ``v`` have
comparable sizes from the first step; the fit is deferred while that scale is not a positive
finite number (``h`` all zeros). The family then fits ``h + damping v`` (``P -> |H + damping
I|^{-1}``); families that integrate the probe add the damping term themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .preconditioners import Preconditioner

__all__ = ["fit_preconditioner"]


def fit_preconditioner(
    family: type[Preconditioner], state: dict[str, Any], v: Tensor | None, h: Tensor, options: Mapping[str, Any]
) -> None:
    """Set the initial scale if it is pending, then one fit of ``Q`` on ``(v, h + damping v)``;
    ``state["precond_updates"]`` counts the fits."""
    if state["scale_pending"]:
        scale = h.pow(4).mean().pow(-0.125)
        if v is not None:
            scale *= v.square().mean().pow(0.25)
        if not bool(scale.isfinite() and scale > 0):
            return
        family.set_scale(state, scale)
        state["scale_pending"] = False
    if v is not None and options["damping"] > 0:
        h = h.add(v, alpha=options["damping"])
    family.update(state, v, h, options)
    state["precond_updates"] += 1
