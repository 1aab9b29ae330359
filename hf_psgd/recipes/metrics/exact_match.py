"""Exact match as an ``evaluate`` metric module, loadable offline: ``evaluate.load("<path to this file>")``."""

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    """The fraction of predicted strings equal to their reference after stripping surrounding whitespace."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of predicted strings equal to their reference (surrounding whitespace ignored).",
            citation="",
            inputs_description="predictions and references: lists of strings of the same length",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        matches = sum(int(p.strip() == r.strip()) for p, r in zip(predictions, references))
        return {"exact_match": matches / len(references) if references else 0.0}
