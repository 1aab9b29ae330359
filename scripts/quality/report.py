"""The suite's Markdown report: results per task with a summary row, tasks, sweeps, run times, environment."""

from __future__ import annotations

import math
import platform
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from bench_step_cost import _cpu_name, _version

from .cache import Record
from .optimizers import ANCHOR_NAMES, OPTIMIZER_NAMES, psgd_code_hash
from .suite import Entry, Suite, held_out_loss
from .tasks import Task

HEADERS = {
    "adamw": "AdamW (tuned)",
    "kron-torch": "kron-torch (tuned)",
    "heavyball": "heavyball (tuned)",
    "psgd-torch": "psgd-torch (tuned)",
    "psgd-torch-newton": "psgd-torch Newton (tuned; exact-H v tasks)",
}


@dataclass
class TaskResult:
    """A task and its entries by optimizer name."""

    task: Task
    entries: dict[str, Entry]
    psgd_lr: float | None

    def gap(self, other: Entry | None) -> float | None:
        """PSGD's relative gap to ``other``'s mean held-out loss (positive: PSGD worse)."""
        psgd = self.entries["psgd"]
        if other is None or psgd.mean is None or other.mean is None or not psgd.complete or not other.complete:
            return None
        if not (math.isfinite(psgd.mean) and math.isfinite(other.mean)) or other.mean == 0:
            return math.inf if not math.isfinite(psgd.mean) else None
        return (psgd.mean - other.mean) / abs(other.mean)

    def best_anchor(self) -> Entry | None:
        anchors = [
            self.entries[n] for n in ANCHOR_NAMES if self.entries[n].complete and self.entries[n].mean is not None
        ]
        return min(anchors, key=lambda e: e.mean, default=None)


def fmt_lr(lr: float | None) -> str:
    """A learning rate in short scientific notation: ``3e-3``, ``1.5e-4``."""
    if lr is None:
        return "—"
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{lr:.1e}".replace(".0e", "e"))


def fmt_gap(gap: float | None) -> str:
    return "—" if gap is None else ("∞" if math.isinf(gap) else f"{100 * gap:+.1f}%")


def cell(entry: Entry, best: float | None) -> str:
    """``mean ± std (lr)``; bold for the row's best, † for a learning rate at the edge of its grid; — where the
    optimizer has no grid on the task."""
    if not entry.grid:
        return "—"
    if entry.skipped and not entry.runs:
        return "not installed"
    if not entry.runs:
        return "not run"
    mean = entry.mean
    diverged = sum(not math.isfinite(loss) for loss in entry.losses)
    spread = f" ± {entry.std:.2g}" if len(entry.runs) > 1 else ""
    text = f"diverged on {diverged}/{len(entry.runs)}" if diverged else f"{mean:.5g}{spread}"
    if best is not None and mean == best:
        text = f"**{text}**"
    partial = "" if entry.complete else f", {len(entry.runs)}/{entry.seeds} seeds"
    return f"{text} ({fmt_lr(entry.lr)}{'†' if entry.at_edge else ''}{partial})"


def results_table(results: Sequence[TaskResult], label: str) -> str:
    names = list(OPTIMIZER_NAMES)
    header = ["task", *(HEADERS.get(n, f"PSGD `{label}`") for n in names), "PSGD vs AdamW", "PSGD vs best anchor"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for result in results:
        means = [e.mean for e in result.entries.values() if e.mean is not None and e.complete]
        best = min(means, default=None)
        cells = [cell(result.entries[n], best) for n in names]
        gaps = [fmt_gap(result.gap(result.entries["adamw"])), fmt_gap(result.gap(result.best_anchor()))]
        lines.append(f"| {result.task.name} | " + " | ".join(cells + gaps) + " |")
    lines.append(summary_row(results, len(names)))
    return "\n".join(lines)


def summary_row(results: Sequence[TaskResult], columns: int) -> str:
    """Wins of PSGD against tuned AdamW and the mean relative gaps, as the table's last row."""
    adamw_gaps = [g for g in (r.gap(r.entries["adamw"]) for r in results) if g is not None]
    anchor_gaps = [g for g in (r.gap(r.best_anchor()) for r in results) if g is not None]
    wins = sum(g < 0 for g in adamw_gaps)
    cells = ["—"] * columns
    cells[1] = f"wins {wins}/{len(adamw_gaps)} vs AdamW"
    mean_gap = [fmt_gap(statistics.fmean(gaps)) if gaps else "—" for gaps in (adamw_gaps, anchor_gaps)]
    return "| **summary** | " + " | ".join(cells + [f"mean {g}" for g in mean_gap]) + " |"


def summary_lines(results: Sequence[TaskResult], label: str) -> list[str]:
    adamw_gaps = [g for g in (r.gap(r.entries["adamw"]) for r in results) if g is not None]
    anchor_gaps = [g for g in (r.gap(r.best_anchor()) for r in results) if g is not None]
    return [
        f"- PSGD `{label}` wins against tuned AdamW (lower mean held-out loss) on {sum(g < 0 for g in adamw_gaps)} "
        f"of {len(adamw_gaps)} tasks with complete results.",
        f"- Mean relative gap to tuned AdamW: {fmt_gap(statistics.fmean(adamw_gaps)) if adamw_gaps else '—'}; to the "
        f"best of the PSGD anchors: {fmt_gap(statistics.fmean(anchor_gaps)) if anchor_gaps else '—'} over "
        f"{len(anchor_gaps)} tasks (positive: PSGD's loss is higher).",
        *same_curvature_line(results),
    ]


def wall_time_line(results: Sequence[TaskResult], wall_seconds: float) -> str:
    psgd_seconds = sum(sum(r.entries["psgd"].seconds()) for r in results)
    adamw_seconds = sum(sum(r.entries["adamw"].seconds()) for r in results)
    return (
        f"- Wall time: PSGD runs {psgd_seconds / 60:.1f} min (training + evaluation, all tasks and seeds); AdamW at "
        f"its chosen learning rates {adamw_seconds / 60:.1f} min; this invocation {wall_seconds / 60:.1f} min."
    )


HELD_OUT_INTRO = (
    "Tasks kept out of the choice of the defaults and of the learning-rate rule (`Task.held_out`): how both carry "
    "over to tasks they were not chosen on. Not in the summary above."
)


def results_section(results: Sequence[TaskResult], label: str) -> str:
    """The results table with its summary row, and the summary lines below it."""
    return results_table(results, label) + "\n\n" + "\n".join(summary_lines(results, label))


def same_curvature_line(results: Sequence[TaskResult]) -> list[str]:
    """On the exact-H v tasks, PSGD's gap to the anchor fitted on the same pairs (psgd-torch's Newton)."""
    gaps = [(r.task.name, r.gap(r.entries["psgd-torch-newton"])) for r in results if r.task.newton_anchor_lrs]
    if not gaps:
        return []
    listed = ", ".join(f"{name} {fmt_gap(gap)}" for name, gap in gaps)
    return [f"- Exact-H v tasks against the anchor of the same curvature, psgd-torch's Newton (tuned): {listed}."]


def metrics_table(results: Sequence[TaskResult]) -> str:
    """Held-out metrics besides the loss (accuracy), mean over seeds at the chosen learning rates."""
    lines = []
    for result in results:
        for metric in sorted({k for e in result.entries.values() for r in e.runs for k in r["metrics"]}):
            values = []
            for name in OPTIMIZER_NAMES:
                found = [r["metrics"][metric] for r in result.entries[name].runs if metric in r["metrics"]]
                values.append(f"{statistics.fmean(found):.4g}" if found else "—")
            lines.append(f"| {result.task.name} | {metric} | " + " | ".join(values) + " |")
    if not lines:
        return ""
    header = "| task | metric | " + " | ".join(OPTIMIZER_NAMES) + " |\n|---|---|" + "---|" * len(OPTIMIZER_NAMES)
    return header + "\n" + "\n".join(lines)


def tasks_table(results: Sequence[TaskResult], suite: Suite) -> str:
    lines = [
        "| task | kind | model | trainable params | training data | held-out set | steps | batch | warm-up | "
        "seeds | PSGD options | PSGD lr |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for result in results:
        task = result.task
        params = next((r["trainable_params"] for e in result.entries.values() for r in e.runs), None)
        options = ", ".join(f"`{k}={v}`" for k, v in task.psgd_options.items()) or "—"
        lines.append(
            f"| {task.name} | {task.kind} | {task.model} | {'—' if params is None else f'{params:,}'} | {task.data} | "
            f"{task.eval_set} | {task.steps} | {task.batch} | {task.warmup} | {len(suite.seeds_for(task))} | "
            f"{options} | {fmt_lr(result.psgd_lr)} |"
        )
    return "\n".join(lines)


def sweeps_table(results: Sequence[TaskResult]) -> str:
    """Every swept learning rate's held-out loss on the first seed."""
    lines = ["| task | optimizer | learning rate: held-out loss on the first seed | chosen |", "|---|---|---|---:|"]
    for result in results:
        for name, entry in result.entries.items():
            points = [f"{fmt_lr(lr)}: {_loss(record)}" for lr, record in entry.sweep.items()]
            lines.append(f"| {result.task.name} | {name} | {'; '.join(points)} | {fmt_lr(entry.lr)} |")
    return "\n".join(lines)


def _loss(record: dict | None) -> str:
    if record is None:
        return "—"
    loss = held_out_loss(record)
    return f"{loss:.5g}" if math.isfinite(loss) else "diverged"


def seconds_table(results: Sequence[TaskResult]) -> str:
    """Mean seconds per run (training + evaluation) at the chosen learning rate."""
    lines = ["| task | " + " | ".join(OPTIMIZER_NAMES) + " |", "|---|" + "---:|" * len(OPTIMIZER_NAMES)]
    for result in results:
        values = [result.entries[name].seconds() for name in OPTIMIZER_NAMES]
        lines.append(
            f"| {result.task.name} | " + " | ".join(f"{statistics.fmean(v):.1f}" if v else "—" for v in values) + " |"
        )
    return "\n".join(lines)


def variants_table(results: Sequence[TaskResult], records: dict[str, dict[str, Record]], suite: Suite) -> str:
    """Every PSGD variant (``--label``) in the cache for the current tasks, optimizer code and seeds: mean held-out
    loss over the seeds found, per learning rate; for comparing ablations."""
    table: dict[str, dict[str, list[str]]] = {}
    for result in results:
        task, version = result.task, psgd_code_hash()
        by_variant: dict[tuple[str, float], list[float]] = {}
        for record in records.get(task.name, {}).values():
            if (record["optimizer"], record.get("task_fingerprint"), record["version"]) == (
                "psgd",
                task.fingerprint(),
                version,
            ) and record["seed"] in suite.seeds_for(task):
                by_variant.setdefault((record["label"], record["lr"]), []).append(held_out_loss(record))
        for (label, lr), losses in sorted(by_variant.items()):
            table.setdefault(label, {}).setdefault(task.name, []).append(
                f"{statistics.fmean(losses):.5g} ({fmt_lr(lr)}, n={len(losses)})"
            )
    header = "| PSGD variant | " + " | ".join(r.task.name for r in results) + " |"
    lines = [header, "|---|" + "---|" * len(results)]
    for label, cells in sorted(table.items()):
        lines.append(f"| `{label}` | " + " | ".join("; ".join(cells.get(r.task.name, ["—"])) for r in results) + " |")
    return "\n".join(lines)


def intro(lr_rule: str) -> str:
    return (
        "Held-out loss after the last step, mean ± std over seeds 0..n-1 (model initialisation and batch order; n "
        "per task in the tasks table), each optimizer at its learning rate in parentheses: the best of its grid on "
        "seed 0 (AdamW, anchors; † at the edge of the grid), the script's rule for PSGD "
        f"({lr_rule}). Every optimizer shares the warm-up + cosine schedule, the steps and the batches of a seed. "
        "Bold: the row's best."
    )


def optimizer_lines(results: Sequence[TaskResult], suite: Suite) -> str:
    """How each optimizer is built (PSGD as on the first task: a task's own options are in the tasks table)."""
    lines = []
    for spec, _ in suite.plan(results[0].task) if results else []:
        version = spec.version() if spec.installed() else "not installed"
        lines.append(f"- `{spec.name}` ({version}): {spec.description}")
    return "\n".join(lines)


def render(results: Sequence[TaskResult], suite: Suite, wall_seconds: float, threads: int) -> str:
    """The whole report."""
    records = {r.task.name: suite.cache.records(r.task.name) for r in results}
    skipped = sorted({f"- {e.optimizer}: {e.skipped}" for r in results for e in r.entries.values() if e.skipped})
    failures = [f"- {line}" for line in suite.failures]
    chosen_on = [r for r in results if not r.task.held_out]
    held_out = [r for r in results if r.task.held_out]
    sections = [
        "# Quality suite: held-out loss of PSGD at its defaults against tuned AdamW and the PSGD anchors",
        intro(suite.lr_rule),
        *([results_section(chosen_on, suite.label)] if chosen_on else []),
        *([f"## Held-out tasks\n\n{HELD_OUT_INTRO}\n\n" + results_section(held_out, suite.label)] if held_out else []),
        wall_time_line(results, wall_seconds),
        "## Other held-out metrics\n\n" + (metrics_table(results) or "none"),
        "## Tasks\n\n" + tasks_table(results, suite),
        "## Optimizers\n\n" + optimizer_lines(results, suite),
        "## Learning-rate sweeps\n\n" + sweeps_table(results),
        "## Seconds per run\n\n" + seconds_table(results),
        "## PSGD variants in the cache\n\n" + variants_table(results, records, suite),
    ]
    if skipped or failures:
        sections.append("## Skipped and failed\n\n" + "\n".join(skipped + failures))
    sections.append("## Environment\n\n" + environment_line(threads))
    return "\n\n".join(sections) + "\n"


def environment_line(threads: int) -> str:
    packages = ("hf_psgd", "kron-torch", "heavyball", "psgd-torch", "opt-einsum", "transformers", "peft")
    versions = ", ".join(f"{name} {_version(name)}" for name in packages)
    return (
        f"torch {torch.__version__}, {threads} thread(s), Python {platform.python_version()}, {_cpu_name()}; {versions}"
    )
