"""Accuracy as an ``evaluate`` metric module, loadable offline: ``evaluate.load("<path to this file>")``."""

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    """The fraction of predictions equal to their reference label."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference label.",
            citation="",
            inputs_description="predictions and references: lists of integer labels of the same length",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions: list[int], references: list[int]) -> dict[str, float]:
        matches = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": matches / len(references) if references else 0.0}
