"""Exact Hessian-vector products inside a Trainer step, micro-batch by micro-batch.

On a step where PSGD fits its preconditioner from exact ``H v``, :class:`HVPBackward` stands in for
``accelerator.backward(loss)``. For every micro-batch it takes the gradient of the (already
gradient-accumulation scaled) loss with ``create_graph=True``, then ``H v`` for the step's single
probe ``v`` against it, and drops the graph at once: peak memory does not grow with the number
of micro-batches. Gradients are summed into ``p.grad`` and products into a buffer; since both are
linear in the loss, the sums are the gradient and ``H v`` of the accumulated loss, with the same
scaling (``1 / steps`` or the ``num_items_in_batch`` token normalisation) as Trainer's gradient.

Under data parallelism the graph never goes through DDP's reducer (``backward(create_graph=True)``
breaks it); instead :meth:`HVPBackward.finish` averages ``[g, H v]`` over processes with one
all-reduce, as DDP would, before Trainer clips the gradient and calls ``optimizer.step()``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ..distributed import all_reduce_mean_, is_multiprocess
from ..optim import PSGD
from ..optim.curvature import hessian_vector_products

__all__ = ["HVPBackward", "check_twice_differentiable", "reentrant_checkpointing_modules"]

_ATTENTION_ADVICE = (
    "exact Hessian-vector products (curvature='hvp') need a twice-differentiable model; load it with "
    "attn_implementation='eager' (or 'sdpa', which PSGD runs on its math backend on HVP steps), or use "
    "curvature='whiten'"
)


def reentrant_checkpointing_modules(model: nn.Module) -> list[str]:
    """Names of modules that checkpoint activations with ``use_reentrant=True``: with it,
    ``backward(create_graph=True)`` silently leaves gradients without a graph."""
    names = []
    for name, module in model.named_modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        checkpointed = getattr(module, "gradient_checkpointing", False) and isinstance(function, functools.partial)
        if checkpointed and function.keywords.get("use_reentrant", False):
            names.append(name or type(module).__name__)
    return names


def check_twice_differentiable(model: nn.Module) -> None:
    """Raise a ``ValueError`` that says what to set if the model cannot give exact ``H v``."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in (None, "eager", "sdpa"):
        raise ValueError(f"attn_implementation={implementation!r}: {_ATTENTION_ADVICE}")
    reentrant = reentrant_checkpointing_modules(model)
    if reentrant:
        raise ValueError(
            f"activation checkpointing with use_reentrant=True (in {reentrant[0]} and {len(reentrant) - 1} more "
            "modules) gives silently wrong Hessian-vector products; set activation_checkpointing_kwargs="
            "{\"use_reentrant\": false} (the transformers default) or use curvature='whiten'"
        )


def _explain(error: RuntimeError) -> RuntimeError:
    message = str(error)
    if "derivative for" in message and "not implemented" in message:
        return RuntimeError(f"{_ATTENTION_ADVICE} (torch: {message.splitlines()[0]})")
    if "use_reentrant=True" in message:
        return RuntimeError(
            "activation checkpointing with use_reentrant=True cannot give Hessian-vector products; set "
            'activation_checkpointing_kwargs={"use_reentrant": false}'
        )
    return error


class HVPBackward:
    """``accelerator.backward`` replacement for the micro-batches of one HVP step (see module doc)."""

    def __init__(self, optimizer: PSGD, uses_grad_scaler: bool) -> None:
        if uses_grad_scaler:
            raise ValueError(
                "curvature='hvp' does not support fp16 loss scaling (the scaler would scale H v invisibly); "
                "use bf16 or fp32"
            )
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self.probes = optimizer.hvp_probes()
        self.products = {p: torch.zeros_like(p) for p in self.probes}

    def __call__(self, loss: Tensor, **_: object) -> None:
        try:
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            probed = [(p, g) for p, g in zip(self.params, grads) if p in self.probes and g is not None]
            if probed:
                params = [p for p, _ in probed]
                products = hessian_vector_products([g for _, g in probed], params, [self.probes[p] for p in params])
                for p, product in zip(params, products):
                    self.products[p].add_(product)
        except RuntimeError as error:
            raise _explain(error) from error
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.detach()
                else:
                    p.grad.add_(g.detach())

    def finish(self) -> None:
        """After the last micro-batch: average over processes, hand ``H v`` to the optimizer."""
        if is_multiprocess():
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            all_reduce_mean_([p.grad for p in self.params] + list(self.products.values()))
        self.optimizer.accumulate_hvp(self.products)
