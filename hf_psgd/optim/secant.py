"""Secant pairs: fitting on the step just taken, as quasi-Newton methods learn.

After a step from ``theta_{t-1}`` to ``theta_t`` the pair ``(s, y) = (theta_t - theta_{t-1}, g_t -
g_{t-1})`` satisfies ``y ~ H s`` along the path taken, for free (no extra gradient). It is scaled
by ``sqrt(n) / |s|`` to the size of a Gaussian probe (so ``lipschitz_beta`` tracks both kinds of
pair on one scale) and fitted as ``(s, y + damping s)``, checked as every fit
(:func:`.fitting.checked_update`). For deterministic objectives only: with
mini-batches ``y`` is dominated by batch-to-batch gradient noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .fitting import checked_update
from .preconditioners import Preconditioner

__all__ = ["fit_secant_pair"]


def fit_secant_pair(
    family: type[Preconditioner],
    state: dict[str, Any],
    param: Tensor,
    grad: Tensor,
    options: Mapping[str, Any],
    keep: Tensor,
) -> None:
    """Fit on the last step's secant pair (none on the first step, while the initial scale is
    pending, or when ``theta`` did not move), then remember ``param`` and ``grad`` (block-shaped,
    in the fit's dtype) in ``state["secant_param"]`` and ``state["secant_grad"]``. Where ``keep`` is
    false (a masked step) the fit is undone and the remembered pair kept."""
    if "secant_param" in state and not state["scale_pending"]:
        s = param - state["secant_param"]
        norm = s.norm()
        if bool(norm > 0):
            scale = math.sqrt(s.numel()) / norm
            s, y = s * scale, (grad - state["secant_grad"]).mul_(scale)
            damped = y.add(s, alpha=options["damping"]) if options["damping"] > 0 else y
            checked_update(family, state, s, damped, y, options, keep)
    if "secant_param" in state:
        state["secant_param"].copy_(torch.where(keep, param, state["secant_param"]))
        state["secant_grad"].copy_(torch.where(keep, grad, state["secant_grad"]))
    else:
        state["secant_param"], state["secant_grad"] = param.clone(), torch.where(keep, grad, 0)
