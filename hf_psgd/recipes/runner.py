"""Running recipes: ``train`` (one run, with its model card and loss curve) and ``compare`` (the same
recipe once per optimizer, or once per optimizer and seed, with a joint loss-curve plot and a table of
final metrics and time)."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, set_seed

from ..cards import write_model_card
from ..plots import plot_loss_curves
from .errors import RecipeError
from .hub import check_hub
from .loading import COMMAND_LINE, Recipe, load_recipe, optimizer_names
from .tasks import build_trainer

__all__ = ["RunResult", "TrainingTime", "compare_recipe", "format_comparison", "loss_records", "train_recipe"]

LOSS_CURVE = "loss_curve.png"
HISTORY = "loss_history.json"
DEFAULT_COMPARISON = ("psgd_kron", "adamw_torch")
COMPARE_SUFFIX = "_compare"
_COLUMNS = {"train_loss": "train loss (run mean)", "eval_loss": "eval loss"}
#: TRL's evaluation bookkeeping, left out of the final metrics (it stays in the loss history).
_BOOKKEEPING = ("eval_num_tokens", "eval_entropy")
_SPEED_SUFFIXES = ("_runtime", "_per_second")


class TrainingTime(TrainerCallback):
    """Adds ``seconds`` to every ``trainer.state.log_history`` entry: the time spent in optimizer steps
    (forward, backward, optimizer) so far; evaluation, checkpointing and start-up left out, so that
    runs compare by training cost."""

    def __init__(self) -> None:
        self.seconds, self._started = 0.0, 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds += time.perf_counter() - self._started

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        state.log_history[-1]["seconds"] = self.seconds


def loss_records(log_history: list[dict[str, float]]) -> list[dict[str, float]]:
    """The entries of ``trainer.state.log_history`` with a training or evaluation loss, speed figures left out."""
    return [
        {key: value for key, value in entry.items() if not key.endswith(_SPEED_SUFFIXES)}
        for entry in log_history
        if "loss" in entry or "eval_loss" in entry
    ]


@dataclass
class RunResult:
    """What one run leaves behind: final metrics (``train_loss``, ``eval_*``, ``train_seconds``,
    ``processes``) and the loss history (see :func:`loss_records`)."""

    name: str
    output_dir: Path
    learning_rate: float
    seed: int
    metrics: dict[str, float]
    records: list[dict[str, float]]


def train_recipe(recipe: Recipe) -> RunResult:
    """Train, evaluate and save ``recipe``'s model; on the main process also write the loss history,
    the loss-curve PNG and the model card into the output directory. A run that needs the Hub and
    cannot reach it stops first (see :func:`~.hub.check_hub`)."""
    set_seed(recipe.training.seed)  # the same initial weights for every optimizer (and every rank)
    try:
        check_hub(recipe)
        trainer = build_trainer(recipe)
    except RecipeError as error:
        raise recipe.locate(error) from None
    timer = TrainingTime()
    trainer.add_callback(timer)
    train_metrics = trainer.train().metrics
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if not evaluations or evaluations[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()
    records = loss_records(trainer.state.log_history)
    last_eval = next(record for record in reversed(records) if "eval_loss" in record)
    metrics = {
        "train_loss": train_metrics["train_loss"],
        **{key: value for key, value in last_eval.items() if key.startswith("eval_") and key not in _BOOKKEEPING},
    }
    if recipe.recipe.task == "causal_lm":
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    metrics.update(train_seconds=timer.seconds, processes=trainer.accelerator.num_processes)
    trainer.save_model()
    if trainer.is_world_process_zero():
        output = Path(recipe.training.output_dir)
        (output / HISTORY).write_text(json.dumps({"metrics": metrics, "records": records}, indent=1))
        plot_loss_curves({recipe.optimizer: records}, output / LOSS_CURVE, title=recipe.path.name)
        write_model_card(recipe, metrics, records, loss_curve=LOSS_CURVE)
    return RunResult(
        recipe.optimizer,
        Path(recipe.training.output_dir),
        recipe.training.learning_rate,
        recipe.training.seed,
        metrics,
        records,
    )


def compare_recipe(
    path: str | Path,
    optimizers: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
) -> list[RunResult]:
    """Run the recipe once per optimizer (same seed, data and steps; learning rates from the recipe's
    ``learning_rates``, else its ``learning_rate``), each into ``<output>/<optimizer>``; then write
    ``loss_curves.png`` and ``results.md`` (see :func:`format_comparison`) into ``<output>``: the
    ``--output_dir`` of ``overrides``, else the recipe's ``output_dir`` with ``_compare`` appended (so
    that ``train`` and ``compare`` of a recipe do not write into the same folder).
    ``optimizers`` defaults to the names in ``learning_rates``, else ``psgd_kron`` and ``adamw_torch``.
    With ``seeds``, every optimizer runs once per seed (model initialisation, data order, dropout),
    into ``<output>/<optimizer>/seed-<seed>``, and the table gives mean and standard deviation."""
    base = load_recipe(path, overrides)
    optimizers = list(optimizers or base.recipe.learning_rates or DEFAULT_COMPARISON)
    unknown = [name for name in optimizers if name not in optimizer_names()]
    if unknown:
        raise RecipeError(
            "optims", f"{unknown[0]!r} is not an optimizer; choose from {', '.join(optimizer_names())}", COMMAND_LINE
        )
    output = Path(base.training.output_dir)
    if "output_dir" not in base.overridden_keys:
        output = output.with_name(output.name + COMPARE_SUFFIX)
    results = []
    for name in optimizers:
        for seed in seeds or [None]:
            run_output = output / name if seed is None else output / name / f"seed-{seed}"
            run_overrides = [*overrides, "--optim", name, "--output_dir", str(run_output)]
            if seed is not None:
                run_overrides += ["--seed", str(seed)]
            results.append(train_recipe(load_recipe(path, run_overrides)))
    if base.training.process_index == 0:
        runs = {_run_label(r, seeds): r.records for r in results}
        groups = None if seeds is None else {_run_label(r, seeds): r.name for r in results}
        plot_loss_curves(runs, output / "loss_curves.png", title=Path(path).name, groups=groups)
        (output / "results.md").write_text(format_comparison(results) + "\n")
    return results


def _run_label(result: RunResult, seeds: Sequence[int] | None) -> str:
    return result.name if seeds is None else f"{result.name} seed {result.seed}"


def format_comparison(results: Sequence[RunResult]) -> str:
    """A Markdown table: per optimizer its learning rate, final train loss (the mean over the run's
    steps), eval figures and training time, with the time relative to the first optimizer. Where an
    optimizer ran with several seeds, its row gives ``mean ± standard deviation`` over them, and a
    second table lists every run."""
    by_name: dict[str, list[RunResult]] = {}
    for result in results:
        by_name.setdefault(result.name, []).append(result)
    metric_keys = ["train_loss", *(key for key in results[0].metrics if key.startswith("eval_"))]
    names = [_COLUMNS.get(key, key.removeprefix("eval_").replace("_", " ")) for key in metric_keys]
    several = any(len(runs) > 1 for runs in by_name.values())
    first_name = results[0].name
    reference = statistics.fmean(r.metrics["train_seconds"] for r in by_name[first_name]) or math.nan
    header = ["optimizer", "learning rate", *(["seeds"] if several else []), *names]
    header += ["train time (s)", f"time / {first_name} time"]
    lines = _table_head(header)
    for name, runs in by_name.items():
        seconds = statistics.fmean(r.metrics["train_seconds"] for r in runs)
        cells = [f"`{name}`", f"{runs[0].learning_rate:g}"]
        cells += [", ".join(str(r.seed) for r in runs)] if several else []
        cells += [_summary([r.metrics.get(key, math.nan) for r in runs]) for key in metric_keys]
        cells += [f"{seconds:.1f}", f"{seconds / reference:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if several:
        lines += ["", "Every run:", "", *_table_head(["optimizer", "seed", *names, "train time (s)"])]
        for result in results:
            cells = [f"`{result.name}`", str(result.seed)]
            cells += [f"{result.metrics.get(key, math.nan):.4f}" for key in metric_keys]
            lines.append("| " + " | ".join([*cells, f"{result.metrics['train_seconds']:.1f}"]) + " |")
    return "\n".join(lines)


def _table_head(header: list[str]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def _summary(values: list[float]) -> str:
    """One value as ``0.1234``; several as ``mean ± sample standard deviation``."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
