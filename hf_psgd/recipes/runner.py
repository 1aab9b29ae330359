"""Running recipes: ``train`` (one run, with its model card and loss curve) and ``compare`` (the same
recipe once per optimizer, with a joint loss-curve plot and a table of final metrics and time)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import Trainer, set_seed

from ..cards import write_model_card
from ..plots import plot_loss_curves
from .errors import RecipeError
from .history import LossHistory
from .loading import COMMAND_LINE, Recipe, load_recipe, optimizer_names
from .tasks import build_trainer

__all__ = ["RunResult", "compare_recipe", "format_comparison", "train_recipe"]

LOSS_CURVE = "loss_curve.png"
HISTORY = "loss_history.json"
DEFAULT_COMPARISON = ("psgd_kron", "adamw_torch")
#: TRL's evaluation bookkeeping, left out of the final metrics (it stays in the loss history).
_BOOKKEEPING = ("eval_num_tokens", "eval_entropy")


@dataclass
class RunResult:
    """What one run leaves behind: final metrics (``train_loss``, ``eval_*``, ``train_seconds``,
    ``processes``) and the loss history (see :class:`~.history.LossHistory`)."""

    name: str
    output_dir: Path
    learning_rate: float
    metrics: dict[str, float]
    records: list[dict[str, float]]


def train_recipe(recipe: Recipe) -> RunResult:
    """Train, evaluate and save ``recipe``'s model; on the main process also write the loss history,
    the loss-curve PNG and the model card into the output directory."""
    set_seed(recipe.training.seed)  # the same initial weights for every optimizer (and every rank)
    try:
        trainer = build_trainer(recipe)
    except RecipeError as error:
        raise recipe.locate(error) from None
    history = LossHistory()
    trainer.add_callback(history)
    train_metrics = trainer.train().metrics
    last_eval = history.last_eval()
    if last_eval is None or last_eval["step"] != trainer.state.global_step:
        trainer.evaluate()
    eval_metrics = {
        key: value for key, value in history.last_eval().items() if key.startswith("eval_") and key not in _BOOKKEEPING
    }
    if recipe.recipe.task == "causal_lm":
        eval_metrics["eval_perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
    metrics = {
        "train_loss": train_metrics["train_loss"],
        **eval_metrics,
        "train_seconds": history.train_seconds,
        "processes": trainer.accelerator.num_processes,
    }
    trainer.save_model()
    if trainer.is_world_process_zero():
        _write_outputs(recipe, trainer, metrics, history)
    return RunResult(
        name=recipe.optimizer,
        output_dir=Path(recipe.training.output_dir),
        learning_rate=recipe.training.learning_rate,
        metrics=metrics,
        records=history.records,
    )


def _write_outputs(recipe: Recipe, trainer: Trainer, metrics: dict[str, float], history: LossHistory) -> None:
    output = Path(recipe.training.output_dir)
    (output / HISTORY).write_text(json.dumps({"metrics": metrics, "records": history.records}, indent=1))
    plot_loss_curves({recipe.optimizer: history.records}, output / LOSS_CURVE, title=recipe.path.name)
    write_model_card(recipe, metrics, history.records, loss_curve=LOSS_CURVE)


def compare_recipe(
    path: str | Path, optimizers: Sequence[str] | None = None, overrides: Sequence[str] = ()
) -> list[RunResult]:
    """Run the recipe once per optimizer (same seed, data and steps; learning rates from the recipe's
    ``learning_rates``, else its ``learning_rate``), each into ``<output_dir>/<optimizer>``; then
    write ``loss_curves.png`` and ``results.md`` (see :func:`format_comparison`) into ``<output_dir>``.
    ``optimizers`` defaults to the names in ``learning_rates``, else ``psgd_kron`` and ``adamw_torch``."""
    base = load_recipe(path, overrides)
    optimizers = list(optimizers or base.recipe.learning_rates or DEFAULT_COMPARISON)
    unknown = [name for name in optimizers if name not in optimizer_names()]
    if unknown:
        raise RecipeError(
            "optims", f"{unknown[0]!r} is not an optimizer; choose from {', '.join(optimizer_names())}", COMMAND_LINE
        )
    output = Path(base.training.output_dir)
    results = []
    for name in optimizers:
        run_overrides = [*overrides, "--optim", name, "--output_dir", str(output / name)]
        results.append(train_recipe(load_recipe(path, run_overrides)))
    if base.training.process_index == 0:
        plot_loss_curves({r.name: r.records for r in results}, output / "loss_curves.png", title=Path(path).name)
        (output / "results.md").write_text(format_comparison(results) + "\n")
    return results


def format_comparison(results: Sequence[RunResult]) -> str:
    """A Markdown table: per optimizer its learning rate, final train and eval figures and training
    time, with the time relative to the first optimizer."""
    metric_keys = [key for key in results[0].metrics if key.startswith("eval_")]
    header = ["optimizer", "learning rate", "train loss", *(key.removeprefix("eval_") for key in metric_keys)]
    header += ["train time (s)", f"time / {results[0].name} time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    reference = results[0].metrics["train_seconds"] or math.nan
    for result in results:
        cells = [f"`{result.name}`", f"{result.learning_rate:g}", f"{result.metrics['train_loss']:.4f}"]
        cells += [f"{result.metrics.get(key, math.nan):.4f}" for key in metric_keys]
        seconds = result.metrics["train_seconds"]
        cells += [f"{seconds:.1f}", f"{seconds / reference:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
