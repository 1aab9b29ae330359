"""hf_psgd: PSGD (preconditioned SGD with Lie-group preconditioners) for the Hugging Face stack."""

from .optim import PRECONDITIONERS, PSGD, register_preconditioner

__all__ = ["PRECONDITIONERS", "PSGD", "register_preconditioner"]
__version__ = "0.1.0"
