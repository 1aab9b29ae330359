"""The optimizer core: a plain PyTorch optimizer (no transformers, accelerate or peft imports)."""

from .preconditioners import PRECONDITIONERS, Preconditioner, get_preconditioner, register_preconditioner
from .psgd import PSGD
from .schedules import DEFAULT_UPDATE_SCHEDULE, update_probability

__all__ = [
    "DEFAULT_UPDATE_SCHEDULE",
    "PRECONDITIONERS",
    "PSGD",
    "Preconditioner",
    "get_preconditioner",
    "register_preconditioner",
    "update_probability",
]
