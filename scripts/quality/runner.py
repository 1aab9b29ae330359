"""One training run: a task's model from a seed, an optimizer at a learning rate, the shared schedule, the
seed's batches, held-out evaluations; the result as a JSON-ready record.

Schedule (every optimizer alike): the learning rate rises linearly over the task's warm-up steps, then
follows a cosine to zero at the last step; it is written into the optimizer before every step. A run whose
training loss stops being finite ends there and is recorded as diverged (held-out loss ``None``).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .optimizers import OptimizerLike, OptimizerSpec, set_learning_rate
from .problems import Batch, Metrics, Problem
from .tasks import Task

CURVE_POINTS = 20  # the training-loss curve is kept as this many chunk means


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The schedule's multiplier of the peak learning rate at 0-based ``step``: linear warm-up, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def eval_steps(task: Task) -> list[int]:
    """The steps after which the held-out set is evaluated (evenly spaced, the last step included)."""
    return sorted({round(task.steps * k / task.evals) for k in range(1, task.evals + 1)})


def train_step(
    spec: OptimizerSpec, optimizer: OptimizerLike, model: nn.Module, problem: Problem, batch: Batch, rng_seed: int
) -> float:
    """One step on ``batch``; returns the training loss. The global generator is seeded with ``rng_seed`` just
    before the forward pass, so dropout draws the same masks whatever the optimizer drew before."""

    def forward() -> Tensor:
        torch.manual_seed(rng_seed)
        return problem.loss(model, batch)

    if spec.closure:  # psgd-torch, or PSGD with exact or finite-difference H v: the optimizer differentiates
        loss = optimizer.step(forward)
    else:
        optimizer.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        optimizer.step()
    return loss.item()


def step_seed(seed: int, step: int) -> int:
    """The global generator's seed for the forward pass of ``step`` of a run of ``seed``."""
    return 1_000_003 * (seed + 1) + step


def evaluate(problem: Problem, model: nn.Module) -> Metrics:
    """Held-out metrics in eval mode, without gradients; the model goes back to training mode."""
    model.eval()
    with torch.no_grad():
        metrics = problem.evaluate(model)
    model.train()
    return metrics


@dataclass
class Run:
    """A run in progress: its optimizer and what it has recorded so far."""

    model: nn.Module
    optimizer: OptimizerLike
    losses: list[float]
    evals: list[tuple[int, Metrics]]
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    diverged: bool = False


def start(task: Task, problem: Problem, spec: OptimizerSpec, lr: float, seed: int) -> Run:
    """The model of ``seed`` (``torch.manual_seed`` first) and its optimizer at ``lr``."""
    torch.manual_seed(seed)
    model = problem.make_model()
    model.train()
    return Run(model, spec.make(problem.trainable(model), lr), [], [])


def train(task: Task, problem: Problem, spec: OptimizerSpec, lr: float, seed: int) -> dict[str, Any]:
    """A whole run; returns its record (see :func:`record`)."""
    run = start(task, problem, spec, lr, seed)
    evaluate_after = set(eval_steps(task))
    for step, batch in enumerate(problem.batches(seed, task.steps, task.batch)):
        set_learning_rate(run.optimizer, lr * lr_factor(step, task.steps, task.warmup))
        began = time.perf_counter()
        run.losses.append(train_step(spec, run.optimizer, run.model, problem, batch, step_seed(seed, step)))
        run.train_seconds += time.perf_counter() - began
        if not math.isfinite(run.losses[-1]):
            run.diverged = True
            break
        if step + 1 in evaluate_after:
            began = time.perf_counter()
            run.evals.append((step + 1, evaluate(problem, run.model)))
            run.eval_seconds += time.perf_counter() - began
    return record(run, problem, spec, lr, seed)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def train_curve(losses: list[float], points: int = CURVE_POINTS) -> list[tuple[int, float]]:
    """``(last step of chunk, mean training loss)`` over ``points`` equal chunks of the run."""
    size = max(1, math.ceil(len(losses) / points))
    chunks = [losses[i : i + size] for i in range(0, len(losses), size)]
    return [(min(len(losses), (i + 1) * size), _finite_or_none(statistics.fmean(c))) for i, c in enumerate(chunks)]


def record(run: Run, problem: Problem, spec: OptimizerSpec, lr: float, seed: int) -> dict[str, Any]:
    """The JSON-ready result: final held-out metrics (``eval_loss`` None when diverged), curves, seconds."""
    final = run.evals[-1][1] if run.evals and not run.diverged else {}
    eval_loss = _finite_or_none(final.get("loss", math.nan))
    return {
        "optimizer": spec.name,
        "lr": lr,
        "seed": seed,
        "eval_loss": eval_loss,
        "metrics": {key: value for key, value in final.items() if key != "loss"},
        "diverged": run.diverged or eval_loss is None,
        "steps_run": len(run.losses),
        "eval_curve": [(step, _finite_or_none(metrics["loss"])) for step, metrics in run.evals],
        "train_curve": train_curve(run.losses),
        "train_seconds": round(run.train_seconds, 2),
        "eval_seconds": round(run.eval_seconds, 2),
        "trainable_params": sum(p.numel() for p in problem.trainable(run.model)),
        "version": spec.version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
