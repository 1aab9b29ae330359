"""``PSGDTrainer``: a ``transformers.Trainer`` that builds PSGD by name and feeds it exact ``H v``.

Compose :class:`PSGDTrainerMixin` with any Trainer subclass (placed first in the bases). It

* answers ``optim="psgd_<family>"`` (see :mod:`.arguments`) in ``get_optimizer_cls_and_kwargs``;
  other names go to Trainer unchanged, and ``optimizer_cls_and_kwargs=(PSGD, {...})`` works too;
* on steps where PSGD fits a preconditioner from exact Hessian-vector products, and only then,
  replaces the backward of every micro-batch by :class:`~.hvp_backward.HVPBackward` (gradient with
  ``create_graph``, ``H v`` for one probe per step, graph freed per micro-batch), runs attention on
  the twice-differentiable math SDPA backend, keeps DDP's reducer out of it and averages ``[g, H v]``
  over processes itself; other steps are Trainer's own;
* under multi-process training, gathers PSGD's sharded preconditioner state before Trainer saves
  ``optimizer.pt`` (the checkpoint is the same at every world size and resumes at any other);
* adds PSGD's figures (``psgd/precond_updates``, ``psgd/rejected_fits``, ``psgd/clipped_updates``,
  ``psgd/skipped_steps``, ``psgd/update_prob``, ``psgd/precond_scale_min|median|max``) to the training logs.

Gradient clipping (``max_grad_norm``) still acts on ``p.grad`` after the averaged gradient is in
place, exactly as for any optimizer. It does not touch ``H v``: the preconditioner is fitted from
``(v, H v)`` of the loss itself, whose curvature does not depend on how the step is later scaled,
so the fit is the same with or without clipping and only the step length changes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Trainer

from ..optim import PSGD
from .arguments import is_psgd_optimizer_name, psgd_optimizer_kwargs
from .hvp_backward import HVPBackward, check_twice_differentiable

__all__ = ["PSGDTrainer", "PSGDTrainerMixin"]


def saves_sharded(fsdp_plugin: Any) -> bool:
    """Whether Accelerate's FSDP plugin (``None`` without FSDP) saves optimizer state sharded, each
    process its own part (``SHARDED_STATE_DICT``)."""
    if fsdp_plugin is None:
        return False
    from torch.distributed.fsdp import StateDictType

    return fsdp_plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT


def unwrap_psgd(optimizer: Any) -> PSGD | None:
    """The PSGD inside Accelerate's (or another) optimizer wrapper, if any."""
    while optimizer is not None and not isinstance(optimizer, PSGD):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class PSGDTrainerMixin:
    """Trainer behaviour for PSGD; see the module docstring. Place it before the Trainer class."""

    _psgd_hvp_backward: HVPBackward | None = None
    _psgd_model_checked = False

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: Any, model: nn.Module | None = None) -> tuple[Any, dict[str, Any]]:
        if is_psgd_optimizer_name(args.optim):
            return PSGD, psgd_optimizer_kwargs(args.optim, args.optim_args, args.learning_rate)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    @property
    def psgd_hvp_step(self) -> bool:
        """Whether the current micro-batch is part of a step that fits PSGD from exact ``H v``."""
        return self._psgd_hvp_backward is not None

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        optimizer = unwrap_psgd(getattr(self, "optimizer", None))
        if self._psgd_hvp_backward is None:
            if optimizer is None or not optimizer.will_update_preconditioner("hvp"):
                return super().training_step(model, inputs, num_items_in_batch)
            if not self._psgd_model_checked:
                check_twice_differentiable(self.accelerator.unwrap_model(model))
                self._psgd_model_checked = True
            self._psgd_hvp_backward = HVPBackward(optimizer, uses_grad_scaler=self.accelerator.scaler is not None)
        backward = self._psgd_hvp_backward
        with contextlib.ExitStack() as stack:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            if self.accelerator.num_processes > 1:
                stack.enter_context(self.accelerator.no_sync(model))
            self.accelerator.backward = backward
            stack.callback(delattr, self.accelerator, "backward")
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            backward.finish()
            self._psgd_hvp_backward = None
        return loss

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Gather sharded preconditioner state first where one process saves it all (Trainer calls this
        on every process but ``optimizer.state_dict()`` on the main one only, and FSDP's
        ``FULL_STATE_DICT`` saves the main process's); FSDP's ``SHARDED_STATE_DICT`` saves every
        process's own blocks through ``torch.distributed.checkpoint`` instead (see
        ``PSGD.consolidate_state_dict``)."""
        optimizer = unwrap_psgd(getattr(self, "optimizer", None))
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        if optimizer is not None and not saves_sharded(plugin):
            optimizer.consolidate_state_dict()
        super()._save_optimizer_and_scheduler(output_dir)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        optimizer = unwrap_psgd(getattr(self, "optimizer", None))
        if optimizer is not None and "loss" in logs:
            logs.update({f"psgd/{name}": value for name, value in optimizer.statistics().items()})
        super().log(logs, *args, **kwargs)


class PSGDTrainer(PSGDTrainerMixin, Trainer):
    """``transformers.Trainer`` with PSGD by name and exact Hessian-vector products (see module doc)."""
