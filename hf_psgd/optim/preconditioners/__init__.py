"""Preconditioner families; importing this package registers the built-in ones."""

from .base import PRECONDITIONERS, Preconditioner, family_option_fields, get_preconditioner, register_preconditioner
from .dense import Dense
from .diag import Diag
from .kron import Kron
from .lra import LRA
from .xmat import XMat

__all__ = [
    "LRA",
    "PRECONDITIONERS",
    "Dense",
    "Diag",
    "Kron",
    "Preconditioner",
    "XMat",
    "family_option_fields",
    "get_preconditioner",
    "register_preconditioner",
]
