"""Preconditioner families; importing this package registers the built-in ones."""

from .base import PRECONDITIONERS, Preconditioner, get_preconditioner, register_preconditioner
from .diag import Diag
from .kron import Kron

__all__ = ["PRECONDITIONERS", "Diag", "Kron", "Preconditioner", "get_preconditioner", "register_preconditioner"]
