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

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "CURVATURES",
    "HandedProducts",
    "ProbeSource",
    "curvature_products",
    "differentiate",
    "finite_difference_hvp",
    "hessian_vector_products",
    "probe_seed",
    "step_gradients",
]

CURVATURES = ("whiten", "hvp", "fd")

_MASK = (1 << 63) - 1


def probe_seed(seed: int, param_index: int, step: int) -> int:
    """A well-mixed 63-bit seed for the probe of one parameter at one step."""
    x = (seed * 0x9E3779B97F4A7C15 + param_index * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & _MASK
    return x ^ (x >> 29)


class ProbeSource:
    """Probes ``v ~ N(0, I)`` drawn from ``(seed, parameter index, step)`` alone; parameters are
    indexed in the order they were added."""

    def __init__(self) -> None:
        self.index: dict[Tensor, int] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def add(self, params: Sequence[Tensor]) -> None:
        for p in params:
            self.index.setdefault(p, len(self.index))

    def reindex(self, params: Sequence[Tensor]) -> None:
        """Index new parameter objects that took the places of the old ones (in the same order)."""
        self.index.clear()
        self.add(params)

    def draw(self, param: Tensor, seed: int, step: int, dtype: torch.dtype) -> Tensor:
        generator = self._generators.get(param.device)
        if generator is None:
            generator = self._generators[param.device] = torch.Generator(device=param.device)
        generator.manual_seed(probe_seed(seed, self.index[param], step))
        return torch.randn(param.shape, generator=generator, dtype=dtype, device=param.device)


class HandedProducts:
    """``H v`` handed over by a training loop for the next step, summed over calls."""

    def __init__(self, params: Mapping[Tensor, int]) -> None:
        self._params = params
        self._products: dict[Tensor, Tensor] = {}

    def add(self, products: Mapping[Tensor, Tensor]) -> None:
        for param, product in products.items():
            if param not in self._params:
                raise ValueError("accumulate_hvp got a tensor that is not a parameter of this optimizer")
            if product.shape != param.shape:
                raise ValueError(
                    f"accumulate_hvp: product of shape {tuple(product.shape)} "
                    f"for a parameter of shape {tuple(param.shape)}"
                )
            product = product.detach()
            previous = self._products.get(param)
            self._products[param] = product.clone() if previous is None else previous.add_(product)

    def take(self) -> dict[Tensor, Tensor]:
        """The products handed over since the last call."""
        products, self._products = self._products, {}
        return products


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


def step_gradients(
    closure: Callable[[], Tensor] | None, params: Sequence[Tensor], differentiate_loss: bool, create_graph: bool
) -> tuple[Tensor | None, dict[Tensor, Tensor]]:
    """The gradients of a step in ``p.grad``, detached: from ``closure`` differentiated here when
    ``differentiate_loss`` (it returns the loss; with ``create_graph`` the graph is kept for ``H
    v``), else from the closure's own ``backward()`` or the caller's. Returns the loss (``None``
    without a closure) and the gradients that carry an autograd graph, for
    :func:`hessian_vector_products`."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    if differentiate_loss:
        for p, g in zip(params, differentiate(loss, params, create_graph=create_graph)):
            p.grad = g
    graphs = {}
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise RuntimeError(
                f"PSGD got a sparse gradient for a parameter of shape {tuple(p.shape)}: preconditioners need dense "
                "gradients; build the layer with sparse=False (e.g. nn.Embedding(..., sparse=False))"
            )
        if p.grad is not None and p.grad.requires_grad:
            graphs[p] = p.grad
            p.grad = p.grad.detach()
    return loss, graphs


def curvature_products(
    probes: Mapping[Tensor, tuple[str, Tensor]],
    grads: Mapping[Tensor, Tensor],
    graph_grads: Mapping[Tensor, Tensor],
    handed: Mapping[Tensor, Tensor],
    closure: Callable[[], Tensor] | None,
) -> dict[Tensor, Tensor]:
    """``H v`` (or its finite-difference estimate) for every parameter in ``probes`` (``param ->
    (curvature, v)``): products ``handed`` over for it, else from its graph-carrying gradient
    (``"hvp"``) or by re-evaluating the closure (``"fd"``)."""
    products: dict[Tensor, Tensor] = {}
    from_graph, from_fd = [], []
    for p, (curvature, probe) in probes.items():
        if curvature == "fd":
            from_fd.append((p, probe))
        elif p in handed:
            products[p] = handed[p]
        elif p in graph_grads:
            from_graph.append((p, probe))
        else:
            raise RuntimeError(
                "curvature='hvp' needs a Hessian-vector product on this step (the preconditioner is "
                "fitted now) but the gradients carry no autograd graph. With transformers.Trainer, use "
                "PSGDTrainer (PSGDSFTTrainer for TRL), which computes H v on these steps; in your own loop "
                "pass a closure that returns the loss to step(closure), or take gradients with "
                "create_graph=True on steps where optimizer.will_update_preconditioner('hvp') is true, or "
                "hand over H v for optimizer.hvp_probes() with optimizer.accumulate_hvp()."
            )
    if from_graph:
        params = [p for p, _ in from_graph]
        hv = hessian_vector_products([graph_grads[p] for p in params], params, [v for _, v in from_graph])
        products.update(zip(params, hv))
    if from_fd:
        if closure is None:
            raise RuntimeError(
                "curvature='fd' needs step(closure) with a deterministic closure that returns the loss "
                "(same batch, no dropout randomness): PSGD re-evaluates it at perturbed parameters"
            )
        params = [p for p, _ in from_fd]
        hv = finite_difference_hvp(closure, params, [grads[p] for p in params], [v for _, v in from_fd])
        products.update(zip(params, hv))
    return products
