"""One trainer per recipe task, ready to train: data tokenized, model and tokenizer loaded, metrics set.

* ``causal_lm``: documents tokenized (eos after each), concatenated and cut into ``block_size``
  blocks; ``PSGDTrainer`` with the language-modelling collator.
* ``sequence_classification``: texts and integer labels; ``PSGDTrainer`` with padding collator and
  the ``accuracy`` metric (or ``metric``).
* ``sft``: prompt/completion pairs for TRL (loss on the completion only); ``PSGDSFTTrainer`` that also
  scores greedy generated answers by exact match at every evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset
from peft import get_peft_model
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
)

from ..cards import BASE_MODEL_FOLDER
from ..integrations.trainer import PSGDTrainer
from .data import first_rows, load_splits
from .errors import RecipeError
from .loading import Recipe
from .models import load_model, load_tokenizer, peft_config

__all__ = ["accuracy", "build_trainer", "evaluation_metric"]

Metric = Callable[..., dict[str, float]]


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> dict[str, float]:
    """The fraction of predicted labels equal to the references."""
    return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}


def evaluation_metric(name: str | None, default: Metric) -> Metric:
    """``evaluate.load(name).compute`` (a Hub metric or metric file: code), else ``default``; both
    called as ``metric(predictions=..., references=...)``."""
    if name is None:
        return default
    import evaluate

    return evaluate.load(name).compute


def build_trainer(recipe: Recipe) -> Trainer:
    """The trainer of ``recipe``'s task (see the module docstring)."""
    train, evaluation = load_splits(recipe.data, recipe.training.seed)
    builders = {"causal_lm": _causal_lm, "sequence_classification": _sequence_classification, "sft": _sft}
    return builders[recipe.recipe.task](recipe, train, evaluation)


def _require_columns(dataset: Dataset, **columns: str) -> None:
    for key, column in columns.items():
        if column not in dataset.column_names:
            raise RecipeError(key, f"no column {column!r}; the data has {', '.join(dataset.column_names)}")


def _texts(dataset: Dataset, *columns: str) -> Iterator[str]:
    for start in range(0, len(dataset), 1000):
        rows = dataset[start : start + 1000]
        yield from chain.from_iterable(rows[column] for column in columns)


def _new_model(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, num_labels: int | None = None) -> PreTrainedModel:
    """The task's model. A model built from a config that gets LoRA adapters is saved first to
    ``<output_dir>/base_model``: the adapters are useless without the (random) base they were trained on."""
    model = load_model(recipe.model, recipe.recipe.task, tokenizer, num_labels)
    if recipe.data.ignore_bias_buffers:  # TRL's DDP workaround: boolean buffers left out of the broadcast
        model._ddp_params_and_buffers_to_ignore = [name for name, b in model.named_buffers() if b.dtype == torch.bool]
    if recipe.model.use_peft and recipe.model.model_name_or_path is None and recipe.training.should_save:
        model.save_pretrained(Path(recipe.training.output_dir) / BASE_MODEL_FOLDER)
    return model


def _peft_wrapped(recipe: Recipe, model: Any) -> Any:
    config = peft_config(recipe.model, recipe.recipe.task)
    return model if config is None else get_peft_model(model, config)


# ---------------------------------------------------------------------------------------- causal LM


def _blocks(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, column: str, block_size: int) -> Dataset:
    """Every document's tokens, then eos, concatenated and cut into blocks of ``block_size``."""

    def tokenize(rows: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(rows[column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [document + [tokenizer.eos_token_id] for document in ids]}

    def group(rows: dict[str, list]) -> dict[str, list]:
        tokens = list(chain.from_iterable(rows["input_ids"]))
        usable = len(tokens) // block_size * block_size
        return {"input_ids": [tokens[i : i + block_size] for i in range(0, usable, block_size)]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenize")
    return tokenized.map(group, batched=True, desc=f"blocks of {block_size}")


def _causal_lm(recipe: Recipe, train: Dataset, evaluation: Dataset) -> Trainer:
    data, args = recipe.data, recipe.training
    _require_columns(train, text_column=data.text_column)
    tokenizer = load_tokenizer(recipe.model, _texts(train, data.text_column))
    model = _peft_wrapped(recipe, _new_model(recipe, tokenizer))
    with args.main_process_first(desc="tokenize"):
        train_blocks = first_rows(_blocks(train, tokenizer, data.text_column, data.block_size), data.max_train_samples)
        eval_blocks = first_rows(
            _blocks(evaluation, tokenizer, data.text_column, data.block_size), data.max_eval_samples
        )
    return PSGDTrainer(
        model=model,
        args=args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )


# ---------------------------------------------------------------------------------------- classification


def _label_names(train: Dataset, column: str) -> list[str]:
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    labels = sorted(set(train[column]))
    if labels != list(range(len(labels))) or len(labels) < 2:
        raise RecipeError("label_column", f"labels must be the integers 0..n-1 (n >= 2); found {labels[:10]}")
    return [str(label) for label in labels]


def _sequence_classification(recipe: Recipe, train: Dataset, evaluation: Dataset) -> Trainer:
    data, args = recipe.data, recipe.training
    _require_columns(train, text_column=data.text_column, label_column=data.label_column)
    names = _label_names(train, data.label_column)
    tokenizer = load_tokenizer(recipe.model, _texts(train, data.text_column))
    model = _new_model(recipe, tokenizer, num_labels=len(names))
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: index for index, name in enumerate(names)}
    model = _peft_wrapped(recipe, model)

    def tokenize(rows: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(rows[data.text_column], truncation=True, max_length=data.max_seq_length)
        return {**encoded, "labels": rows[data.label_column]}

    with args.main_process_first(desc="tokenize"):
        train_set, eval_set = (
            first_rows(split, count).map(tokenize, batched=True, remove_columns=split.column_names, desc="tokenize")
            for split, count in ((train, data.max_train_samples), (evaluation, data.max_eval_samples))
        )
    metric = evaluation_metric(data.metric, accuracy)

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metric(predictions=np.argmax(logits, axis=-1), references=prediction.label_ids)

    return PSGDTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )


# ---------------------------------------------------------------------------------------- SFT


def _sft(recipe: Recipe, train: Dataset, evaluation: Dataset) -> Trainer:
    from .exact_match import ExactMatchSFTTrainer, GeneratedExactMatch, exact_match  # imports TRL: sft only

    data = recipe.data
    columns = {"prompt_column": data.prompt_column, "completion_column": data.completion_column}
    _require_columns(train, **columns)
    _require_columns(evaluation, **columns)

    def to_prompt_completion(row: dict[str, Any]) -> dict[str, str]:
        prompt = data.prompt_template.replace("{prompt}", row[data.prompt_column])
        return {"prompt": prompt, "completion": row[data.completion_column]}

    train, evaluation = (
        first_rows(split, count).map(to_prompt_completion, remove_columns=split.column_names, desc="prompts")
        for split, count in ((train, data.max_train_samples), (evaluation, data.max_eval_samples))
    )
    tokenizer = load_tokenizer(recipe.model, _texts(train, "prompt", "completion"))
    model = _new_model(recipe, tokenizer)
    exact_match = GeneratedExactMatch(
        evaluation["prompt"],
        evaluation["completion"],
        evaluation_metric(data.metric, exact_match),
        answer_pattern=data.answer_pattern,
        max_new_tokens=data.max_new_tokens,
        batch_size=recipe.training.per_device_eval_batch_size,
    )
    return ExactMatchSFTTrainer(
        model=model,
        args=recipe.training,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config(recipe.model, "sft"),
        exact_match=exact_match,
    )
