"""The optimizer core: a plain PyTorch optimizer (no transformers, accelerate or peft imports)."""

from .options import CURVATURE_DEFAULTS, DEFAULT_LEARNING_RATES, default_learning_rate, learning_rate_from_adamw
from .preconditioners import PRECONDITIONERS, Preconditioner, get_preconditioner, register_preconditioner
from .psgd import PSGD
from .schedules import DEFAULT_UPDATE_SCHEDULE, update_probability

__all__ = [
    "CURVATURE_DEFAULTS",
    "DEFAULT_LEARNING_RATES",
    "DEFAULT_UPDATE_SCHEDULE",
    "PRECONDITIONERS",
    "PSGD",
    "Preconditioner",
    "default_learning_rate",
    "get_preconditioner",
    "learning_rate_from_adamw",
    "register_preconditioner",
    "update_probability",
]
