"""Two processes (``accelerate launch --multi_gpu --num_processes 2``: two gloo ranks on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_helpers import tiny_llama
from launch.train_two_ranks import train

LAUNCHER = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("optim_args", ["curvature=hvp,precond_update_prob=0.5", "curvature=whiten"])
def test_two_ranks_end_with_the_weights_of_one_process(tmp_path: Path, optim_args: str) -> None:
    """Both ranks end with identical weights, moved from the initial ones and equal to those of one
    process training on the same 8 rows per step (within 1% of the distance each tensor travelled)."""
    script = Path(__file__).parent / "launch" / "train_two_ranks.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*LAUNCHER, str(script), str(tmp_path), optim_args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    initial = tiny_llama().state_dict()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the tiny model is many times slower on 2 threads of a busy CPU
    try:
        one_process = train(tmp_path / "one_process", optim_args, accumulation=4).model.state_dict()
    finally:
        torch.set_num_threads(threads)
    for name, param in ranks[0]["params"].items():
        assert torch.equal(param, ranks[1]["params"][name]), name
        travelled = (param - initial[name]).norm().item()
        assert travelled > 0, f"{name} did not move"
        distance = (param - one_process[name]).norm().item()
        assert distance <= 0.01 * travelled, f"{name}: {distance:.3g} from one process's, travelled {travelled:.3g}"
