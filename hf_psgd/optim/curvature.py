"""Where the fitting pairs ``(v, h)`` come from.

* ``whiten``: ``v ~ N(0, I)`` and ``h`` the gradient (or the momentum): ``P -> E[h h^T]^{-1/2}``;
  no second backward.
* ``hvp``: ``h = H v`` exactly, by differentiating the gradient (it must carry an autograd graph:
  ``create_graph=True``) against ``v``: ``P -> |H|^{-1}``.
* ``fd``: ``h = (g(theta + delta v) - g(theta)) / delta``, a finite difference of gradients, by
  re-evaluating a deterministic closure at perturbed parameters.

Probe vectors are a pure function of ``(seed, parameter index, step)``: a resumed run, every rank
of a data-parallel run and a training loop that asks for them in advance all draw the same ``v``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "CURVATURES",
    "differentiate",
    "finite_difference_hvp",
    "hessian_vector_products",
    "probe_seed",
]

CURVATURES = ("whiten", "hvp", "fd")

_MASK = (1 << 63) - 1


def probe_seed(seed: int, param_index: int, step: int) -> int:
    """A well-mixed 63-bit seed for the probe of one parameter at one step."""
    x = (seed * 0x9E3779B97F4A7C15 + param_index * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & _MASK
    return x ^ (x >> 29)


def _zeros_for_none(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if t is None else t for t, p in zip(tensors, like)]


def differentiate(loss: Tensor, params: Sequence[Tensor], create_graph: bool) -> list[Tensor]:
    """``d loss / d params`` (zeros for unused parameters), keeping the graph when asked."""
    if not isinstance(loss, Tensor) or not loss.requires_grad:
        raise RuntimeError(
            "the closure must return the loss tensor, still attached to the autograd graph, for "
            f"curvature 'hvp' or 'fd' (got {type(loss).__name__}); do not call backward() in it: "
            "PSGD differentiates the loss itself"
        )
    with torch.enable_grad():
        try:
            grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        except RuntimeError as error:
            if "backward through the graph a second time" not in str(error):
                raise
            raise RuntimeError(
                "the closure called backward() on its loss; with curvature 'hvp' or 'fd' it must only "
                "return the loss (PSGD differentiates it)"
            ) from error
    return _zeros_for_none(grads, params)


def hessian_vector_products(
    grads: Sequence[Tensor], params: Sequence[Tensor], probes: Sequence[Tensor]
) -> list[Tensor]:
    """``H v`` for each parameter, from gradients that carry a graph (``create_graph=True``).

    A gradient without a graph does not depend on the parameters: its rows of ``H`` are zero.
    """
    with_graph = [i for i, g in enumerate(grads) if g.requires_grad]
    result = [torch.zeros_like(p) for p in params]
    if with_graph:
        with torch.enable_grad():
            products = torch.autograd.grad(
                [grads[i] for i in with_graph],
                params,
                grad_outputs=[probes[i].to(grads[i].dtype) for i in with_graph],
                allow_unused=True,
            )
        result = _zeros_for_none(products, params)
    return result


@torch.no_grad()
def finite_difference_hvp(
    closure: Callable[[], Tensor],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    probes: Sequence[Tensor],
) -> list[Tensor]:
    """``(g(theta + delta v) - g(theta)) / delta`` with ``delta = sqrt(eps)`` of each parameter's dtype.

    The parameters are restored bit for bit afterwards (saved copies, not a subtraction). The
    closure must be deterministic (same batch, no dropout randomness) for the difference to mean
    anything.
    """
    saved = [p.detach().clone() for p in params]
    deltas = [torch.finfo(p.dtype).eps ** 0.5 for p in params]
    for p, v, delta in zip(params, probes, deltas):
        p.add_(v.to(p.dtype), alpha=delta)
    try:
        with torch.enable_grad():
            perturbed = differentiate(closure(), params, create_graph=False)
    finally:
        for p, original in zip(params, saved):
            p.copy_(original)
    return [(gp - g).div_(delta) for gp, g, delta in zip(perturbed, grads, deltas)]
