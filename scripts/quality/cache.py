"""Results cached per run in one JSON file per task (``<folder>/<task>.json``), written after every run.

Invocations may share a folder and even a task (e.g. two ablations of one task on two cores): each write
holds an exclusive lock on ``<task>.json.lock``, merges its run into the file as it is on disk, then
replaces the file, so no invocation drops another's runs.

A run's key names everything its result depends on: the task's fingerprint, the optimizer, its variant (for
PSGD: ``--label`` and a hash of its options), its version (an anchor's package version, a hash of hf_psgd's
optimizer code, torch's version for AdamW), the learning rate and the seed. So a rerun reuses exactly the
runs whose inputs did not change; an interrupted suite resumes after its last finished run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def options_hash(options: Mapping[str, Any]) -> str:
    """A short hash of optimizer options (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(dict(options), sort_keys=True, default=str).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RunId:
    """What a cached run depends on."""

    task: str
    fingerprint: str
    optimizer: str
    variant: str
    version: str
    lr: float
    seed: int

    def key(self) -> str:
        parts = (self.optimizer, self.variant, self.version, f"lr={self.lr!r}", f"seed={self.seed}", self.fingerprint)
        return "|".join(parts)


class ResultCache:
    """Records by :class:`RunId`, one JSON file per task, each file rewritten atomically after a run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._loaded: dict[str, dict[str, Record]] = {}

    def path(self, task: str) -> Path:
        return self.folder / f"{task}.json"

    def records(self, task: str) -> dict[str, Record]:
        """Every cached record of ``task`` by key (read once; :meth:`put` refreshes it)."""
        if task not in self._loaded:
            self._loaded[task] = self._read(task)
        return self._loaded[task]

    def get(self, run: RunId) -> Record | None:
        return self.records(run.task).get(run.key())

    def put(self, run: RunId, record: Record) -> None:
        """Stores ``record`` under ``run``: under the task's lock, merged into the file as it is on disk
        (runs other invocations wrote since this one read it are kept), written to a temporary file, renamed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked(run.task):
            runs = self._read(run.task)
            runs[run.key()] = {**record, "variant": run.variant, "task_fingerprint": run.fingerprint}
            path = self.path(run.task)
            temporary = path.with_suffix(f".json.{os.getpid()}.tmp")
            temporary.write_text(json.dumps({"task": run.task, "runs": runs}, indent=1, sort_keys=True) + "\n")
            os.replace(temporary, path)
        self._loaded[run.task] = runs

    def _read(self, task: str) -> dict[str, Record]:
        path = self.path(task)
        return json.loads(path.read_text())["runs"] if path.exists() else {}

    @contextmanager
    def _locked(self, task: str) -> Iterator[None]:
        """An exclusive ``flock`` on the task's lock file for the duration of the block."""
        with open(self.folder / f"{task}.json.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
