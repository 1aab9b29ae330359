"""What README.md shows works as it says: the HVP patterns, the shell quoting of a schedule, the
note on plain TrainingArguments."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_psgd import PSGDTrainingArguments

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _pattern(number: int) -> list[str]:
    """The code lines of the README's HVP pattern ``# <number>.`` (up to the next pattern)."""
    block = README.split(f"# {number}. ", 1)[1].split(f"# {number + 1}. ", 1)[0]
    return [line for line in block.splitlines()[1:] if line.strip() and not line.lstrip().startswith("#")]


def test_readme_own_gradients_pattern_gives_the_closure_steps_without_warnings() -> None:
    """Pattern 2 (gradients with their graph, taken by hand) must not warn (backward(create_graph=True)
    warns once per process, hence a fresh one) and must step exactly as pattern 1 (a closure)."""
    constructor, *closure_step = _pattern(1)
    steps = ("\n".join(closure_step), "\n".join(_pattern(2)))
    script = f"""
import warnings
import torch
from hf_psgd import PSGD

warnings.simplefilter("error")
loss_fn = torch.nn.functional.cross_entropy
inputs, targets = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
finals = []
for step in {steps!r}:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    {constructor}
    for _ in range(3):
        exec(step)
    assert optimizer.statistics()["precond_updates"] == 3 * 4, optimizer.statistics()
    finals.append([p.detach().clone() for p in model.parameters()])
assert all(torch.equal(a, b) for a, b in zip(*finals))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_readme_shell_quoting_of_a_schedule_parses() -> None:
    (quoted,) = re.findall(r"`(--optim_args '[^']*;[^']*')`", README)
    parser = HfArgumentParser(PSGDTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "out", "--optim", "psgd_kron", *shlex.split(quoted)])
    assert args.optim_args == "precond_update_prob=flat_steps:100;decay:0.01"


def test_readme_says_plain_training_arguments_do_not_know_psgd_names() -> None:
    with pytest.raises(ValueError, match="psgd_kron is not a valid OptimizerNames"):
        TrainingArguments(output_dir="out", optim="psgd_kron")
    names = README.split("Pick PSGD by name with `PSGDTrainingArguments`", 1)[1].split("```", 1)[0]
    assert "plain `transformers.TrainingArguments` does not know these names" in names
    assert "nor does plain `Trainer`" in names and "PSGDTrainer" in names
