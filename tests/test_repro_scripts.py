"""The paper-reproduction scripts run end to end (``--quick``) and write their table and plot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
BASELINES = ["AdamW", "SGD momentum 0.9"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "name", "rows"),
    [
        ("repro_delayed_xor.py", "delayed_xor", ["PSGD-LRA (hvp, rank 10)", *BASELINES]),
        ("repro_digits_lenet.py", "digits_lenet", [*(f"PSGD-LRA r={rank}" for rank in (0, 1, 2, 5, 10)), *BASELINES]),
    ],
)
def test_quick_run_writes_table_and_plot(tmp_path: Path, script: str, name: str, rows: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPTS / script), "--quick", "--out-dir", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, env=env, timeout=120)
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    table = (tmp_path / f"{name}.md").read_text()
    for row in rows:
        assert f"| {row} |" in table
