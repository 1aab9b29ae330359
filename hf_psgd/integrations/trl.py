"""TRL: ``PSGDSFTConfig`` / ``PSGDSFTTrainer`` for instruction tuning (e.g. LoRA adapters via PEFT).

``SFTTrainer`` rebuilds a foreign ``TrainingArguments`` as ``SFTConfig(**args.to_dict())``, so PSGD
names need an ``SFTConfig`` of their own. TRL's default loss goes through a fused, chunked LM-head
kernel that is not twice differentiable. On exact-HVP steps the trainer hands TRL's own
``compute_loss`` the same loss computed from the full logits (its ``compute_loss_func`` route), so
TRL still records ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` on every step, from one
extra forward without gradient through the fused head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from trl import SFTConfig, SFTTrainer

from .arguments import PSGDArgumentsMixin
from .trainer import PSGDTrainerMixin

__all__ = ["PSGDSFTConfig", "PSGDSFTTrainer"]


@dataclass
class PSGDSFTConfig(PSGDArgumentsMixin, SFTConfig):
    """``trl.SFTConfig`` that also accepts ``optim="psgd_kron"`` (and every other PSGD family).

    Activation checkpointing is on by default, as in TRL, but set under transformers' current name
    (``activation_checkpointing``): TRL's default of the deprecated ``gradient_checkpointing`` made every
    default config raise transformers' deprecation warning. ``gradient_checkpointing`` still works (with
    that warning)."""

    gradient_checkpointing: bool | None = field(
        default=None, metadata=dict(SFTConfig.__dataclass_fields__["gradient_checkpointing"].metadata)
    )

    def __post_init__(self) -> None:
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default, without the deprecated name
        super().__post_init__()


def _logits_sft_loss(loss_type: str) -> Callable[..., Tensor]:
    """TRL's default SFT loss (``nll``, or ``dft``) from full logits instead of its fused head: the
    summed negative log-likelihood of the next-token labels over ``num_items_in_batch`` (else over
    the labelled tokens), with DFT's weighting by the detached probability."""

    def loss(outputs: Any, labels: Tensor, num_items_in_batch: Any = None) -> Tensor:
        labels = labels[:, 1:].to(outputs.logits.device)
        mask = labels != -100
        log_probs = outputs.logits[:, :-1].float().log_softmax(-1)
        log_probs = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        per_token = -log_probs * log_probs.exp().detach() if loss_type == "dft" else -log_probs
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        return per_token.sum() / torch.as_tensor(count).clamp(min=1)

    return loss


class PSGDSFTTrainer(PSGDTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` with PSGD by name and exact Hessian-vector products."""

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        smoothed = self.label_smoother is not None and self.args.loss_type == "nll"
        if not self.psgd_hvp_step or self.compute_loss_func is not None or smoothed:  # TRL takes full logits there
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.compute_loss_func = _logits_sft_loss(self.args.loss_type)
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self.compute_loss_func = None
