"""Checks of option values, and the base of the families' option dataclasses.

Every check raises ``ValueError`` naming the option, the value and what is allowed (``TypeError``
for an unknown option name).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["DTYPES", "FamilyOptions", "check", "dtype_name", "is_int", "is_number", "refuse_unknown"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check(name: str, value: Any, ok: bool, allowed: str) -> None:
    """``ValueError("{name}={value!r} is invalid: expected {allowed}")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {allowed}")


def is_number(value: Any) -> bool:
    """A finite real ``int`` or ``float`` (``bool``, NaN and infinities excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def dtype_name(value: Any, option: str) -> str | None:
    """``None`` or the name in :data:`DTYPES` of a ``torch.dtype`` or its name (``"torch."`` prefix allowed)."""
    if value is None:
        return None
    for name, dtype in DTYPES.items():
        if value == dtype or (isinstance(value, str) and value.removeprefix("torch.") == name):
            return name
    raise ValueError(f"{option}={value!r} is invalid: expected None or one of {sorted(DTYPES)}")


@dataclasses.dataclass(frozen=True)
class FamilyOptions:
    """Base of a family's options: a frozen dataclass whose fields are the options and defaults.

    Subclasses check their fields in :meth:`validate` (with :func:`check`)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming a bad option."""

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> FamilyOptions:
        """The options of a param group (which holds every family's fields), validated."""
        options = cls(**{f.name: group[f.name] for f in dataclasses.fields(cls)})
        options.validate()
        return options


def refuse_unknown(given: Iterable[str], known: Iterable[str], what: str) -> None:
    """``TypeError`` naming an unknown name, the closest known one and all known ones."""
    known = sorted(known)
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"PSGD got an unknown {what} {name!r}{hint}; known: {', '.join(known)}")
