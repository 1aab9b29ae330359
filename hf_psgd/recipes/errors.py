"""The one error a bad recipe raises: it names the key, what is wrong, and where the key was set."""

from __future__ import annotations

__all__ = ["RecipeError", "first_line"]


class RecipeError(Exception):
    """A bad recipe key or value. ``source`` is the recipe file or ``"command line"``; the runner
    fills it in for errors found after parsing (a missing data file, a model that cannot be loaded)."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        super().__init__(key, message, source)
        self.key, self.message, self.source = key, message, source

    def __str__(self) -> str:
        located = f"{self.key}: {self.message}"
        return f"{self.source}: {located}" if self.source else located


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
