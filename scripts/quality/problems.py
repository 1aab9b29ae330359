"""What the training loop needs from a task: a model, the batches of a seed, a training loss, a held-out score.

Three kinds of problem: byte-level language modelling on a corpus (``tiny_gpt``'s model and windows), tensors
in memory (images, regression), and a recipe of ``recipes/`` built offline with ``hf_psgd.recipes`` (its
tokenizer, model and collated datasets; the Trainer that builds them is not used for training).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from repro_digits_lenet import Data
from tiny_gpt import GPTConfig, TinyGPT, random_batch
from torch import Tensor, nn
from torch.nn import functional as F

Batch = Any
Metrics = dict[str, float]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require a gradient (all but frozen base weights)."""
    return [p for p in model.parameters() if p.requires_grad]


@dataclass
class Problem:
    """A task made concrete. ``make_model`` runs under ``torch.manual_seed(seed)``; ``batches(seed, steps,
    size)`` yields the same batches for every optimizer of a seed; ``evaluate`` runs in eval mode without
    gradients and returns ``{"loss": held-out loss, ...}``."""

    make_model: Callable[[], nn.Module]
    batches: Callable[[int, int, int], Iterator[Batch]]
    loss: Callable[[nn.Module, Batch], Tensor]
    evaluate: Callable[[nn.Module], Metrics]
    trainable: Callable[[nn.Module], list[nn.Parameter]] = trainable_parameters


def epoch_indices(count: int, seed: int, steps: int, size: int) -> Iterator[Tensor]:
    """``steps`` batches of ``size`` example indices: shuffled epochs (a fresh permutation per epoch)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while order.numel() < size:
            order = torch.cat([order, torch.randperm(count, generator=generator)])
        yield order[:size]
        order = order[size:]


# ---------------------------------------------------------------------------------------------- corpus


def corpus_problem(train: Tensor, held_out: Tensor, config: GPTConfig, eval_windows: int = 128) -> Problem:
    """A ``TinyGPT`` on byte tokens: random training windows (``tiny_gpt.random_batch``), held-out loss over
    ``eval_windows`` evenly spaced windows of ``held_out``."""
    span = config.seq + 1
    starts = torch.linspace(0, held_out.numel() - span, eval_windows).long().tolist()
    eval_tokens = torch.stack([held_out[s : s + span] for s in starts])

    def batches(seed: int, steps: int, size: int) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return (random_batch(train, size, config.seq, generator) for _ in range(steps))

    def evaluate(model: nn.Module) -> Metrics:
        chunks = eval_tokens.split(32)
        return {"loss": sum(model.loss(chunk).item() * len(chunk) for chunk in chunks) / eval_windows}

    return Problem(lambda: TinyGPT(config), batches, lambda model, tokens: model.loss(tokens), evaluate)


# ---------------------------------------------------------------------------------------------- tensors


def tensor_problem(data: Data, make_model: Callable[[], nn.Module], classification: bool) -> Problem:
    """Inputs and targets in memory: cross-entropy (and accuracy) or mean squared error on the test split."""

    def loss(model: nn.Module, indices: Tensor) -> Tensor:
        return _tensor_loss(model(data.x_train[indices]), data.y_train[indices], classification)

    def evaluate(model: nn.Module) -> Metrics:
        output = model(data.x_test)
        metrics = {"loss": _tensor_loss(output, data.y_test, classification).item()}
        if classification:
            metrics["accuracy"] = (output.argmax(-1) == data.y_test).float().mean().item()
        return metrics

    def batches(seed: int, steps: int, size: int) -> Iterator[Tensor]:
        return epoch_indices(len(data.y_train), seed, steps, size)

    return Problem(make_model, batches, loss, evaluate)


def _tensor_loss(output: Tensor, target: Tensor, classification: bool) -> Tensor:
    return F.cross_entropy(output, target) if classification else F.mse_loss(output.squeeze(-1), target)


# ---------------------------------------------------------------------------------------------- recipes


def recipe_problem(path: Path, make_model: Callable[[Any, Any], nn.Module]) -> Problem:
    """A recipe's data, built offline by ``hf_psgd.recipes`` (``build_trainer``: tokenizer trained or loaded,
    datasets tokenized, collator); ``make_model(recipe, trainer)`` builds a fresh model per run. The held-out
    loss is the recipe evaluation set's loss per predicted token (per example for classification)."""
    from hf_psgd.recipes import load_recipe
    from hf_psgd.recipes.tasks import build_trainer

    with tempfile.TemporaryDirectory() as output_dir:  # an SFT recipe saves its random base model there
        recipe = load_recipe(path, ["--output_dir", output_dir, "--report_to", "none"])
        trainer = build_trainer(recipe)
    collate = trainer.data_collator
    train_set, eval_set = trainer.train_dataset, trainer.eval_dataset
    eval_size = recipe.training.per_device_eval_batch_size
    rows = [eval_set[i] for i in range(len(eval_set))]
    eval_batches = [collate(rows[start : start + eval_size]) for start in range(0, len(rows), eval_size)]

    def batches(seed: int, steps: int, size: int) -> Iterator[dict[str, Tensor]]:
        for indices in epoch_indices(len(train_set), seed, steps, size):
            yield collate([train_set[i] for i in indices.tolist()])

    def loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return model(**batch).loss

    return Problem(lambda: make_model(recipe, trainer), batches, loss, _recipe_evaluation(eval_batches))


def _recipe_evaluation(eval_batches: list[dict[str, Tensor]]) -> Callable[[nn.Module], Metrics]:
    def evaluate(model: nn.Module) -> Metrics:
        total = count = correct = 0.0
        for batch in eval_batches:
            output = model(**batch)
            labels = batch["labels"]
            weight = labels.numel() if labels.dim() == 1 else (labels[:, 1:] != -100).sum().item()
            total += output.loss.item() * weight
            count += weight
            if labels.dim() == 1:
                correct += (output.logits.argmax(-1) == labels).sum().item()
        metrics = {"loss": total / count}
        if eval_batches and eval_batches[0]["labels"].dim() == 1:
            metrics["accuracy"] = correct / count
        return metrics

    return evaluate
