"""Results cached per run in one JSON file per task (``<folder>/<task>.json``), written after every run.

A run's key names everything its result depends on: the task's fingerprint, the optimizer, its variant (for
PSGD: ``--label`` and a hash of its options), its version (an anchor's package version, a hash of hf_psgd's
optimizer code, torch's version for AdamW), the learning rate and the seed. So a rerun reuses exactly the
runs whose inputs did not change; an interrupted suite resumes after its last finished run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
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
        """Every cached record of ``task`` by key."""
        if task not in self._loaded:
            path = self.path(task)
            self._loaded[task] = json.loads(path.read_text())["runs"] if path.exists() else {}
        return self._loaded[task]

    def get(self, run: RunId) -> Record | None:
        return self.records(run.task).get(run.key())

    def put(self, run: RunId, record: Record) -> None:
        """Stores ``record`` under ``run`` and rewrites the task's file (temporary file, then rename)."""
        runs = self.records(run.task)
        runs[run.key()] = {**record, "variant": run.variant, "task_fingerprint": run.fingerprint}
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(run.task)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps({"task": run.task, "runs": runs}, indent=1, sort_keys=True) + "\n")
        os.replace(temporary, path)
