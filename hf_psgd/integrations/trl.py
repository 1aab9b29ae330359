"""TRL: ``PSGDSFTConfig`` / ``PSGDSFTTrainer`` for instruction tuning (e.g. LoRA adapters via PEFT).

``SFTTrainer`` rebuilds a foreign ``TrainingArguments`` as ``SFTConfig(**args.to_dict())``, so PSGD
names need an ``SFTConfig`` of their own. TRL's default loss goes through a fused, chunked LM-head
kernel that is not twice differentiable; on exact-HVP steps the trainer computes the loss through
the plain logits path (``Trainer.compute_loss``) instead, which loses SFT's entropy and
token-accuracy metrics for those steps only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from .arguments import PSGDArgumentsMixin
from .trainer import PSGDTrainerMixin

__all__ = ["PSGDSFTConfig", "PSGDSFTTrainer"]


@dataclass
class PSGDSFTConfig(PSGDArgumentsMixin, SFTConfig):
    """``trl.SFTConfig`` that also accepts ``optim="psgd_kron"`` (and every other PSGD family)."""


class PSGDSFTTrainer(PSGDTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` with PSGD by name and exact Hessian-vector products."""

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if self.psgd_hvp_step:
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
