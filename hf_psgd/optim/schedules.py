"""Preconditioner update probability schedules, as plain data.

A schedule is either a number ``p`` in ``(0, 1]`` (constant) or a dict

    {"flat_steps": 200, "decay": 0.003, "min_prob": 0.03}

meaning ``p(t) = 1`` for ``t < flat_steps``, then ``max(min_prob, exp(-decay (t - flat_steps)))``.
The default above (the floor from about step 1370; 13% of the first 5000 steps fit) has the
references' shape but decays faster than their ``flat_steps=500, decay=0.001`` (kron_torch, timm,
pytorch_optimizer: the floor from about step 4000, 30% of 5000 steps). On ``recipes/causal_lm.yaml``
it trained better with whitening and about as well with exact HVPs (+0.006 eval loss) in 27% less
time (see ``scripts/README.md``). Being plain data, a schedule
survives ``state_dict()`` and ``torch.load(weights_only=True)``.

Update decisions are deterministic: each block accumulates "credit" ``c <- c + p(t)`` and updates
its preconditioner whenever ``c >= 1`` (then ``c <- c - 1``), so over any window the number of
updates is the integral of ``p`` and a training loop can know a step in advance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .validation import is_number

__all__ = ["DEFAULT_UPDATE_SCHEDULE", "Schedule", "update_probability", "validate_schedule"]

Schedule = float | Mapping[str, float]

DEFAULT_UPDATE_SCHEDULE: dict[str, float] = {"flat_steps": 200, "decay": 0.003, "min_prob": 0.03}

_KEYS = ("flat_steps", "decay", "min_prob")


def validate_schedule(schedule: Any, name: str = "precond_update_prob") -> Schedule:
    """``schedule`` normalised to plain data; ``ValueError`` naming what is wrong otherwise."""
    allowed = f"a number in (0, 1] or a dict with keys {list(_KEYS)}"
    if is_number(schedule):
        if not 0.0 < float(schedule) <= 1.0:
            raise ValueError(f"{name}={schedule!r} is invalid: expected {allowed}")
        return float(schedule)
    if not isinstance(schedule, Mapping):
        raise ValueError(f"{name}={schedule!r} is invalid: expected {allowed}")
    unknown = sorted(set(schedule) - set(_KEYS))
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}: expected {allowed}")
    for key, value in schedule.items():
        if not is_number(value):
            raise ValueError(f"{name}={dict(schedule)!r} is invalid: {key}={value!r} is not a finite number")
    merged = {**DEFAULT_UPDATE_SCHEDULE, **{k: float(v) for k, v in schedule.items()}}
    if merged["flat_steps"] < 0 or merged["decay"] < 0 or not 0.0 < merged["min_prob"] <= 1.0:
        raise ValueError(f"{name}={dict(schedule)!r} is invalid: need flat_steps >= 0, decay >= 0, 0 < min_prob <= 1")
    return merged


def update_probability(schedule: Schedule, step: int) -> float:
    """The probability of a preconditioner update at (0-based) step ``step``."""
    if isinstance(schedule, float):
        return schedule
    flat = schedule["flat_steps"]
    if step < flat:
        return 1.0
    return max(schedule["min_prob"], math.exp(-schedule["decay"] * (step - flat)))
