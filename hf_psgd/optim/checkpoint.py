"""Optimizer state in checkpoints: copies to a device, and the checks of a loaded state."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["copy_to_device"]


def copy_to_device(value: Any, device: torch.device) -> Any:
    """A deep copy of nested dicts, lists and tuples with every tensor copied to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {k: copy_to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_to_device(v, device) for v in value)
    return value
