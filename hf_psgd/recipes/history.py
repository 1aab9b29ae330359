"""Loss curves of a run: train and eval figures per logged step, with the training time spent so far."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

__all__ = ["LossHistory"]

_SPEED_SUFFIXES = ("_runtime", "_per_second")


class LossHistory(TrainerCallback):
    """Records ``{"step", "seconds", "loss" | "eval_loss", other eval_* figures}`` at every log.

    ``seconds`` is the time spent in optimizer steps (forward, backward, optimizer) up to that
    step; evaluation, checkpointing and start-up are left out, so runs compare by training cost.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self._step_started: float | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._step_started is not None:
            self.train_seconds += time.perf_counter() - self._step_started
            self._step_started = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        figures = {
            key: float(value)
            for key, value in (logs or {}).items()
            if (key == "loss" or key.startswith("eval_"))
            and not key.endswith(_SPEED_SUFFIXES)
            and isinstance(value, (int, float))
        }
        if figures:
            self.records.append({"step": state.global_step, "seconds": self.train_seconds, **figures})

    def last_eval(self) -> dict[str, float] | None:
        """The latest record with an ``eval_loss``."""
        return next((record for record in reversed(self.records) if "eval_loss" in record), None)
