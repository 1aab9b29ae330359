"""``evaluate`` metric modules shipped with hf_psgd (``evaluate`` itself bundles none, so offline
``evaluate.load("accuracy")`` fails; ``evaluate.load`` of a module file works)."""

from __future__ import annotations

from pathlib import Path

import evaluate

__all__ = ["BUNDLED_METRICS", "load_metric"]

BUNDLED_METRICS = ("accuracy", "exact_match")


def load_metric(name_or_path: str) -> evaluate.EvaluationModule:
    """A bundled metric by name (``accuracy``, ``exact_match``), or any ``evaluate.load`` argument
    (a Hub metric name, a path to a metric module file)."""
    if name_or_path in BUNDLED_METRICS:
        name_or_path = str(Path(__file__).with_name(f"{name_or_path}.py"))
    return evaluate.load(name_or_path)
