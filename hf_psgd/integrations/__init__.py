"""Hugging Face glue: TrainingArguments with PSGD names, the Trainer mixin, TRL classes."""

from .arguments import PSGDArgumentsMixin, PSGDTrainingArguments, psgd_optimizer_kwargs, psgd_optimizer_names
from .trainer import PSGDTrainer, PSGDTrainerMixin

__all__ = [
    "PSGDArgumentsMixin",
    "PSGDTrainer",
    "PSGDTrainerMixin",
    "PSGDTrainingArguments",
    "psgd_optimizer_kwargs",
    "psgd_optimizer_names",
]
