"""Exact match of generated answers: greedy generation from each prompt, compared with the reference."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..integrations.trl import PSGDSFTTrainer

__all__ = ["ExactMatchSFTTrainer", "ExactMatchTrainerMixin", "GeneratedExactMatch", "exact_match", "extract_answer"]


def extract_answer(text: str, pattern: re.Pattern[str] | None) -> str:
    """The answer in ``text``: the first group of ``pattern``'s first match (empty if none), or the
    whole stripped text without a pattern."""
    if pattern is None:
        return text.strip()
    match = pattern.search(text)
    return match.group(1).strip() if match else ""


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The fraction of answers equal to their reference, surrounding whitespace ignored."""
    matches = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return {"exact_match": matches / len(references) if references else 0.0}


class GeneratedExactMatch:
    """Scores a model: greedy answers to ``prompts`` against ``references`` with ``metric(predictions=,
    references=)`` (:func:`exact_match`, or an evaluate metric's ``compute``)."""

    def __init__(
        self,
        prompts: Sequence[str],
        references: Sequence[str],
        metric: Callable[..., dict[str, float]] = exact_match,
        answer_pattern: str | None = None,
        max_new_tokens: int = 16,
        batch_size: int = 32,
    ) -> None:
        self.prompts, self.metric = list(prompts), metric
        self.pattern = re.compile(answer_pattern) if answer_pattern else None
        self.references = [extract_answer(text, self.pattern) for text in references]
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def generate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The greedy continuation of every prompt, decoded without special tokens."""
        answers = []
        device = next(model.parameters()).device
        for start in range(0, len(self.prompts), self.batch_size):
            batch = tokenizer(
                self.prompts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=False,  # as TRL tokenizes prompts
            ).to(device)
            with torch.no_grad():
                output = model.generate(
                    **batch,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return answers

    def __call__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            predictions = [extract_answer(text, self.pattern) for text in self.generate(model, tokenizer)]
        finally:
            model.train(was_training)
        return self.metric(predictions=predictions, references=self.references)


class ExactMatchTrainerMixin:
    """Adds the metric of generated answers (``eval_exact_match``, see :class:`GeneratedExactMatch`)
    to every evaluation of a Trainer; place it first in the bases."""

    def __init__(self, *args: Any, exact_match: GeneratedExactMatch, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exact_match = exact_match

    def evaluation_loop(self, *args: Any, metric_key_prefix: str = "eval", **kwargs: Any) -> Any:
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        scores = self.exact_match(model, self.processing_class)
        output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in scores.items()})
        return output


class ExactMatchSFTTrainer(ExactMatchTrainerMixin, PSGDSFTTrainer):
    """``PSGDSFTTrainer`` that scores generated answers at every evaluation."""
