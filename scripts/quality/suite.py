"""Which runs the suite needs, taken from the cache or trained: sweeps on the first seed, the best learning rate
on every seed.

Selection rule (the same for every optimizer and for the report): each learning rate of the optimizer's grid
runs on the first seed; the one with the lowest held-out loss (a diverged run counts as infinite) is the
optimizer's learning rate on that task, and runs on the other seeds. PSGD's grid is the single learning rate of
the script's rule (which may read AdamW's chosen rate), so it runs on every seed without a sweep.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from .cache import Record, ResultCache, RunId, options_hash
from .optimizers import ADAMW, PSGD_TORCH_NEWTON, OptimizerSpec, anchor_specs, psgd_spec
from .problems import Problem
from .runner import train
from .tasks import Task

Fetch = Callable[[float, int], Record | None]
#: PSGD's learning-rate rule: the task and AdamW's tuned learning rate (``None`` if unknown) to PSGD's rate
# (``None``: the rule cannot say without AdamW's)
LearningRateRule = Callable[[Task, float | None], float | None]


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Sends what Python and native code (the tokenizers trainer's progress lines, the anchors' notes) write to
    standard output to standard error instead: standard output is for the report."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def held_out_loss(record: Record) -> float:
    """A record's held-out loss; infinite when the run diverged."""
    loss = record.get("eval_loss")
    return math.inf if loss is None else loss


@dataclass
class Entry:
    """One optimizer on one task: the sweep on the first seed and the runs at the chosen learning rate."""

    optimizer: str
    grid: tuple[float, ...]
    sweep: dict[float, Record | None]
    lr: float | None
    runs: list[Record]
    seeds: int  # seeds asked for
    skipped: str | None = None  # why it could not run at all

    @property
    def losses(self) -> list[float]:
        return [held_out_loss(r) for r in self.runs]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.losses) if self.runs else None

    @property
    def std(self) -> float:
        finite = [x for x in self.losses if math.isfinite(x)]
        return statistics.stdev(finite) if len(finite) > 1 else 0.0

    @property
    def complete(self) -> bool:
        return len(self.runs) == self.seeds

    @property
    def at_edge(self) -> bool:
        """The chosen learning rate is the smallest or largest of a grid of several: the grid may be too narrow."""
        return len(self.grid) > 1 and self.lr in (min(self.grid), max(self.grid))

    def seconds(self) -> list[float]:
        return [r["train_seconds"] + r["eval_seconds"] for r in self.runs]


def collect(optimizer: str, grid: tuple[float, ...], seeds: list[int], fetch: Fetch) -> Entry:
    """The sweep on ``seeds[0]``, the best learning rate, and its runs on every seed (what ``fetch`` returns)."""
    sweep = {lr: fetch(lr, seeds[0]) for lr in grid}
    done = {lr: record for lr, record in sweep.items() if record is not None}
    if not done:
        return Entry(optimizer, grid, sweep, None, [], len(seeds))
    best = min(done, key=lambda lr: held_out_loss(done[lr]))
    runs = [done[best], *(fetch(best, seed) for seed in seeds[1:])]
    return Entry(optimizer, grid, sweep, best, [r for r in runs if r is not None], len(seeds))


@dataclass
class Suite:
    """Runs (or only looks up, for optimizers not in ``may_run``) every entry of every task.

    ``psgd_lr`` is the learning-rate rule for PSGD; ``psgd_options`` and ``label`` name a PSGD variant;
    ``rerun`` lists optimizers whose cached runs are trained again (once per invocation); ``seeds``, when
    given, is the number of seeds on every task instead of each task's own."""

    cache: ResultCache
    seeds: int | None
    psgd_lr: LearningRateRule
    psgd_options: dict[str, Any]
    label: str
    may_run: Collection[str]
    rerun: Collection[str] = ()
    lr_rule: str = "PSGD's learning rate by the script's rule"  # the rule in words, for the report
    failures: list[str] = field(default_factory=list)
    _problems: dict[str, Problem] = field(default_factory=dict)
    _fresh: set[str] = field(default_factory=set)

    def seeds_for(self, task: Task) -> list[int]:
        """The task's seeds: ``0 .. n-1`` with ``n`` the suite's override, else the task's own count."""
        return list(range(self.seeds or task.seeds))

    def psgd(self, task: Task) -> OptimizerSpec:
        return psgd_spec({**task.psgd_options, **self.psgd_options})

    def psgd_grid(self, task: Task, adamw_lr: float | None) -> tuple[float, ...]:
        """PSGD's one learning rate from the rule, given AdamW's tuned rate; empty when the rule needs that rate
        and it is unknown."""
        lr = self.psgd_lr(task, adamw_lr)
        return () if lr is None else (lr,)

    def plan(self, task: Task, adamw_lr: float | None = None) -> list[tuple[OptimizerSpec, tuple[float, ...]]]:
        """Every optimizer of the task with its learning-rate grid (psgd-torch's Newton: empty, not run, but on the
        exact-H v tasks)."""
        anchors = [(spec, task.anchor_lrs) for spec in anchor_specs()] + [(PSGD_TORCH_NEWTON, task.newton_anchor_lrs)]
        return [(ADAMW, task.adamw_lrs), (self.psgd(task), self.psgd_grid(task, adamw_lr)), *anchors]

    def entries(self, task: Task) -> list[Entry]:
        """The task's entries, in table order, training what is missing where allowed (AdamW first: PSGD's
        learning-rate rule may read its tuned rate)."""
        found: list[Entry] = []
        for spec, grid in self.plan(task):
            if spec.name == "psgd":
                grid = self.psgd_grid(task, found[0].lr)
            entry = collect(spec.name, grid, self.seeds_for(task), self._fetcher(task, spec))
            if not spec.installed():
                entry.skipped = f"{spec.distribution} is not installed"
            elif not grid and spec.name == "psgd":
                entry.skipped = f"psgd on {task.name}: its learning-rate rule needs AdamW's tuned rate; run adamw first"
            found.append(entry)
        return found

    def run_id(self, task: Task, spec: OptimizerSpec, lr: float, seed: int) -> RunId:
        """A PSGD run (and psgd-torch Newton's) is the task's own; AdamW's and the whitening anchors' are its baseline
        task's (:meth:`Task.baseline`)."""
        variant = f"{self.label}:{options_hash(spec.options)}" if spec.name == "psgd" else ""
        owner = task if spec.own_runs else task.baseline()
        return RunId(
            owner.name, owner.fingerprint(), spec.name, variant, spec.version() if spec.installed() else "", lr, seed
        )

    def _fetcher(self, task: Task, spec: OptimizerSpec) -> Fetch:
        def fetch(lr: float, seed: int) -> Record | None:
            run_id = self.run_id(task, spec, lr, seed)
            cached = self.cache.get(run_id)
            stale = spec.name in self.rerun and run_id.key() not in self._fresh
            if (cached is not None and not stale) or spec.name not in self.may_run or not spec.installed():
                return cached
            return self._train(task, spec, run_id)

        return fetch

    def _train(self, task: Task, spec: OptimizerSpec, run_id: RunId) -> Record | None:
        where = f"{task.name} {spec.name} lr={run_id.lr:g} seed={run_id.seed}"
        try:
            with stdout_to_stderr():
                record = train(task, self.problem(task), spec, run_id.lr, run_id.seed)
        except Exception as error:  # one broken run (an anchor's bug, say) must not end a suite of hours
            traceback.print_exc()
            self.failures.append(f"{where}: {type(error).__name__}: {error}")
            return None
        record.update(label=self.label if spec.name == "psgd" else spec.name, options=dict(spec.options))
        self.cache.put(run_id, record)
        self._fresh.add(run_id.key())
        loss = "diverged" if record["diverged"] else f"{record['eval_loss']:.5g}"
        print(f"{where}: held-out loss {loss} ({record['train_seconds']:.1f} s)", file=sys.stderr)
        return record

    def problem(self, task: Task) -> Problem:
        """The task's data and model factory, built once per invocation."""
        if task.name not in self._problems:
            began = time.perf_counter()
            with stdout_to_stderr():
                self._problems[task.name] = task.build()
            print(f"{task.name}: built in {time.perf_counter() - began:.1f} s", file=sys.stderr)
        return self._problems[task.name]
