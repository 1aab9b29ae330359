"""Fits of a block's preconditioner: the initial scale, damping, and the check of every fit.

``Q`` starts as ``scale I`` with ``scale = (mean v^2)^{1/4} (mean h^4)^{-1/8}`` from the first pair
(``(mean h^4)^{-1/8}`` when the family integrates the probe out), so that ``P h`` and ``v`` have
comparable sizes from the first step; the fit is deferred while that scale is not a positive
finite number (``h`` all zeros). The family then fits ``h + damping v`` (``P -> |H + damping
I|^{-1}``); families that integrate the probe add the damping term themselves.

Every fit is checked on the device, with no host synchronisation: a fit on a pair with ``h = 0``
(a stall: no gradient, so nothing is learnt about the curvature, while the fit would inflate ``P``
towards ``1 / damping``) and a fit whose result is not finite anywhere (bound, ``Q``, ``P``; read from
their sums, :func:`~.preconditioners.base.finite_sums`) are undone, and ``state["rejected_fits"]``
counts them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from .preconditioners import Preconditioner

__all__ = ["checked_update", "checked_updates", "fit_preconditioners"]


def checked_update(
    family: type[Preconditioner],
    state: dict[str, Any],
    v: Tensor | None,
    h: Tensor,
    raw_h: Tensor,
    options: Mapping[str, Any],
    keep: Tensor,
) -> None:
    """:func:`checked_updates` of one block."""
    checked_updates(family, [state], [v], [h], [raw_h], options, keep)


def checked_updates(
    family: type[Preconditioner],
    states: Sequence[dict[str, Any]],
    vs: Sequence[Tensor | None],
    hs: Sequence[Tensor],
    raw_hs: Sequence[Tensor],
    options: Mapping[str, Any],
    keep: Tensor,
) -> None:
    """``family.update(state, v, h, options)`` of every block (batched where the family can:
    :meth:`~.preconditioners.Preconditioner.update_checked_many`), undone where ``keep`` is false (a
    masked step), the block's ``raw_h`` (``h`` before damping) is all zeros or any tensor it fitted comes
    out non-finite; ``state["rejected_fits"]`` counts the undone. Each state is conformed to ``options``
    first (:meth:`~.preconditioners.Preconditioner.conform_state`), which no rejection undoes."""
    for state in states:
        family.conform_state(state, options)
    accept = [keep & raw_h.any() for raw_h in raw_hs]  # any nonzero (or NaN) element
    for state, kept in zip(states, family.update_checked_many(states, vs, hs, options, accept)):
        state["rejected_fits"] += ~kept


def _scale_is_set(
    family: type[Preconditioner], state: dict[str, Any], v: Tensor | None, h: Tensor, keep: Tensor
) -> bool:
    """Set the initial scale from the pair if it is pending and ``keep`` is true (one host sync, on the
    block's first fit only); whether the block has its scale (not while ``h`` is all zeros)."""
    if state["scale_pending"]:
        scale = h.pow(4).mean().pow(-0.125)
        if v is not None:
            scale *= v.square().mean().pow(0.25)
        if not bool(keep & scale.isfinite() & (scale > 0)):
            return False
        family.set_scale(state, scale)
        state["scale_pending"] = False
    return True


def fit_preconditioners(
    family: type[Preconditioner],
    pairs: Sequence[tuple[dict[str, Any], Tensor | None, Tensor]],
    options: Mapping[str, Any],
    keep: Tensor,
    checked: Callable[..., None] = checked_updates,
) -> None:
    """For blocks ``(state, v, h)`` of one family and param group: set the initial scale where pending,
    then one checked fit of every block with its scale on ``(v, h + damping v)`` (undone where ``keep``
    is false) by ``checked`` (:func:`checked_updates`, or its compiled form); ``state["precond_updates"]``
    counts the fits tried."""
    ready = [(state, v, h) for state, v, h in pairs if _scale_is_set(family, state, v, h, keep)]
    if not ready:
        return
    damping = options["damping"]
    damped = [h.add(v, alpha=damping) if v is not None and damping > 0 else h for _, v, h in ready]
    states, vs, raw_hs = (list(column) for column in zip(*ready))
    checked(family, states, vs, damped, raw_hs, options, keep)
    for state in states:
        state["precond_updates"] += 1
