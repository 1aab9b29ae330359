"""hf_psgd: PSGD (preconditioned SGD with Lie-group preconditioners) for the Hugging Face stack.

``PSGD`` is a plain PyTorch optimizer. The Trainer classes import transformers (and TRL for the
SFT ones) on first access, so ``from hf_psgd import PSGD`` stays light.
"""

from importlib import import_module
from typing import Any

from .optim import PRECONDITIONERS, PSGD, learning_rate_from_adamw, register_preconditioner

__version__ = "0.3.0"

_LAZY = {
    "PSGDTrainer": "hf_psgd.integrations.trainer",
    "PSGDTrainerMixin": "hf_psgd.integrations.trainer",
    "PSGDTrainingArguments": "hf_psgd.integrations.arguments",
    "PSGDArgumentsMixin": "hf_psgd.integrations.arguments",
    "PSGDSFTConfig": "hf_psgd.integrations.trl",
    "PSGDSFTTrainer": "hf_psgd.integrations.trl",
}

__all__ = ["PRECONDITIONERS", "PSGD", "learning_rate_from_adamw", "register_preconditioner", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_psgd' has no attribute {name!r}")
