"""Fits of a block's preconditioner: the initial scale, damping, and the check of every fit.

``Q`` starts as ``scale I`` with ``scale = (mean v^2)^{1/4} (mean h^4)^{-1/8}`` from the first pair
(``(mean h^4)^{-1/8}`` when the family integrates the probe out), so that ``P h`` and ``v`` have
comparable sizes from the first step; the fit is deferred while that scale is not a positive
finite number (``h`` all zeros). The family then fits ``h + damping v`` (``P -> |H + damping
I|^{-1}``); families that integrate the probe add the damping term themselves.

Every fit is checked on the device, with no host synchronisation: a fit on a pair with ``h = 0``
(a stall: no gradient, so nothing is learnt about the curvature, while the fit would inflate ``P``
towards ``1 / damping``) and a fit whose result is not finite anywhere (bound, ``Q``, ``P``) are
undone, and ``state["rejected_fits"]`` counts them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .preconditioners import Preconditioner

__all__ = ["checked_update", "fit_preconditioner", "fitted_tensors"]


def fitted_tensors(family: type[Preconditioner], state: Mapping[str, Any]) -> list[Tensor]:
    """The tensors of the family's state (``family.state_keys``), lists flattened."""
    tensors = []
    for key in family.state_keys:
        value = state[key]
        tensors.extend(value if isinstance(value, list) else [value])
    return tensors


def checked_update(
    family: type[Preconditioner],
    state: dict[str, Any],
    v: Tensor | None,
    h: Tensor,
    raw_h: Tensor,
    options: Any,
    keep: Tensor,
) -> None:
    """``family.update(state, v, h, options)``, undone where ``keep`` is false (a masked step),
    ``raw_h`` (``h`` before damping) is all zeros or any fitted tensor comes out non-finite;
    ``state["rejected_fits"]`` counts the undone. The state is conformed to ``options`` first
    (:meth:`~.preconditioners.Preconditioner.conform_state`), which no rejection undoes."""
    family.conform_state(state, options)
    tensors = fitted_tensors(family, state)
    saved = [t.clone() for t in tensors]
    family.update(state, v, h, options)
    accepted = keep & raw_h.ne(0).any() & torch.stack([t.isfinite().all() for t in tensors]).all()
    for tensor, old in zip(tensors, saved):
        tensor.copy_(torch.where(accepted, tensor, old))
    state["rejected_fits"] += ~accepted


def fit_preconditioner(
    family: type[Preconditioner],
    state: dict[str, Any],
    v: Tensor | None,
    h: Tensor,
    options: Mapping[str, Any],
    keep: Tensor,
    checked: Callable[..., None] = checked_update,
) -> None:
    """Set the initial scale if it is pending (one host sync, on the block's first fit only), then one
    checked fit of ``Q`` on ``(v, h + damping v)`` (undone where ``keep`` is false) by ``checked``
    (:func:`checked_update`, or its compiled form); ``state["precond_updates"]`` counts the fits tried."""
    if state["scale_pending"]:
        scale = h.pow(4).mean().pow(-0.125)
        if v is not None:
            scale *= v.square().mean().pow(0.25)
        if not bool(scale.isfinite() and scale > 0):
            return
        family.set_scale(state, scale)
        state["scale_pending"] = False
    damped = h.add(v, alpha=options["damping"]) if v is not None and options["damping"] > 0 else h
    checked(family, state, v, damped, h, options, keep)
    state["precond_updates"] += 1
