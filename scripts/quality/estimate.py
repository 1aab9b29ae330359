"""How long the suite takes, extrapolated from a few timed steps per task and optimizer (``--estimate``).

Per task and optimizer (seed 0, the first learning rate of its grid): the seconds to build the model and the
optimizer; the median step (forward, backward, optimizer step) over ``steps`` steps with the preconditioner
fitted on every step, then, after the optimizer's switch that stops fits, over ``steps`` apply-only steps; one
held-out evaluation. A run of ``T`` steps then costs ``build + T (apply + f (fit - apply)) + evals * eval``,
``f`` the mean of the optimizer's update probability over the ``T`` steps (1 for AdamW and psgd-torch). The
suite: AdamW ``len(grid) + seeds - 1`` runs, each anchor ``len(grid) + seeds - 1``, PSGD ``seeds``; the PSGD-only
rerun: PSGD's runs alone. Building each task's data once per invocation is added to both.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import torch

from hf_psgd.optim.schedules import update_probability, validate_schedule

from .optimizers import OptimizerSpec
from .problems import Batch, Problem
from .runner import Run, evaluate, start, step_seed, train_step
from .suite import Suite, stdout_to_stderr
from .tasks import Task


@dataclass
class Timing:
    """Measured seconds of one optimizer on one task, and the extrapolated seconds of a full run."""

    task: str
    optimizer: str
    build: float
    fit_step: float
    apply_step: float
    fit_fraction: float
    evaluation: float
    run: float


def mean_fit_fraction(spec: OptimizerSpec, steps: int) -> float:
    """The mean preconditioner-update probability over ``steps`` steps (1 for optimizers without one)."""
    if spec.apply_only is None:
        return 1.0
    schedule = validate_schedule(spec.update_schedule)
    return statistics.fmean(update_probability(schedule, t) for t in range(steps))


def median_step(spec: OptimizerSpec, run: Run, problem: Problem, batches: list[Batch]) -> float:
    """Median seconds of a training step over ``batches``."""
    seconds = []
    for step, batch in enumerate(batches):
        began = time.perf_counter()
        train_step(spec, run.optimizer, run.model, problem, batch, step_seed(0, step))
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds)


def time_optimizer(task: Task, problem: Problem, spec: OptimizerSpec, lr: float, steps: int) -> Timing:
    """Measures ``spec`` on ``task`` (see the module docstring)."""
    batches = [batch for _, batch in zip(range(2 * steps + 1), problem.batches(0, 2 * steps + 1, task.batch))]
    began = time.perf_counter()
    run = start(task, problem, spec, lr, 0)
    build = time.perf_counter() - began
    train_step(
        spec, run.optimizer, run.model, problem, batches[0], step_seed(0, 0)
    )  # first step: lazy state, initial scales
    fit = median_step(spec, run, problem, batches[1 : steps + 1])
    apply = fit
    if spec.apply_only is not None:
        spec.apply_only(run.optimizer)
        apply = median_step(spec, run, problem, batches[steps + 1 :])
    began = time.perf_counter()
    evaluate(problem, run.model)
    evaluation = time.perf_counter() - began
    fraction = mean_fit_fraction(spec, task.steps)
    total = build + task.steps * (apply + fraction * (fit - apply)) + task.evals * evaluation
    return Timing(task.name, spec.name, build, fit, apply, fraction, evaluation, total)


def timing_row(timing: Timing, runs: int) -> str:
    cells = [
        timing.task,
        timing.optimizer,
        f"{timing.build:.2f}",
        f"{timing.fit_step:.4f}",
        f"{timing.apply_step:.4f}",
        f"{timing.fit_fraction:.2f}",
        f"{timing.evaluation:.2f}",
        f"{timing.run:.0f}",
        str(runs),
        f"{runs * timing.run:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def _seeds_text(suite: Suite, tasks: list[Task]) -> str:
    counts = sorted({len(suite.seeds_for(task)) for task in tasks})
    return f"{' or '.join(map(str, counts))} seeds per task"


def estimate(suite: Suite, tasks: list[Task], steps: int) -> str:
    """Times every installed optimizer on every task; returns the Markdown table and the totals."""
    lines = [
        "| task | optimizer | build s | step s (fit) | step s (apply) | mean fit prob. | eval s | s per run | runs "
        "| s in suite |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    total = psgd_only = 0.0
    for task in tasks:
        seeds = len(suite.seeds_for(task))
        began = time.perf_counter()
        problem = suite.problem(task)
        data_seconds = time.perf_counter() - began
        total, psgd_only = total + data_seconds, psgd_only + data_seconds
        for spec, grid in suite.plan(task, adamw_lr=task.adamw_lrs[0]):  # any rate: only the time matters
            if not spec.installed() or not grid:
                continue
            try:
                with stdout_to_stderr():
                    timing = time_optimizer(task, problem, spec, grid[0], steps)
            except Exception as error:  # reported in the table, as the suite reports a failed run
                failed = [task.name, spec.name, f"failed: {type(error).__name__}: {error}"] + [""] * 7
                lines.append("| " + " | ".join(failed) + " |")
                continue
            runs = seeds if len(grid) == 1 else len(grid) + seeds - 1
            total += runs * timing.run
            psgd_only += seeds * timing.run if spec.name == "psgd" else 0.0
            print(f"{task.name} {spec.name}: {timing.run:.0f} s per run", file=sys.stderr)
            lines.append(timing_row(timing, runs))
    lines.append("")
    lines.append(
        f"Whole suite from scratch ({_seeds_text(suite, tasks)}, {torch.get_num_threads()} thread(s)): "
        f"{total / 60:.0f} min; "
        f"PSGD-only rerun (`--only psgd`, the rest cached): {psgd_only / 60:.1f} min."
    )
    return "\n".join(lines)
