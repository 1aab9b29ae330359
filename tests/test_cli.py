"""``hf-psgd``: help for each subcommand, and bad recipes that fail with one clear line (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_psgd.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_help_of_each_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "train" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    assert "hf-psgd train RECIPE.yaml" in capsys.readouterr().out
    assert main(["compare", "--help"]) == 0
    assert "--optims" in capsys.readouterr().out


def _help_entry(text: str, key: str) -> str:
    """The help of ``--key`` in ``--help`` output, on one line."""
    (entry,) = [part for part in text.split("\n  --") if part.split()[0] == key]
    return " ".join(entry.split("\n\n")[0].split())


def test_help_with_a_recipe_shows_its_keys_and_values(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipe's values (and the command line's) as defaults, PSGD's options, at most 200 lines."""
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["train", str(RECIPES / "sft_lora.yaml"), "--max_steps", "7", "--help"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) <= 200
    assert out.index("--optim_args") < out.index("--task") < out.index("--model_name_or_path") < out.index("--seed")
    expected = {"learning_rate": "0.3", "task": "sft", "max_steps": "7", "max_length": "32", "lora_r": "8"}
    for key, value in expected.items():
        assert _help_entry(out, key).endswith(f"(default: {value})"), key
    optim_args = _help_entry(out, "optim_args")
    assert "curvature=whiten (whiten or hvp), momentum=0.9" in optim_args and "AdEMAMix" not in optim_args
    assert "precond_lr=None (float; None: the curvature's, whiten 0.2, hvp 0.1, fd 0.1)" in optim_args
    recipe_value = "curvature=hvp,momentum=0.5,damping=0.01,max_update_growth=2.0"
    assert "".join(optim_args.split()).endswith(f"(default:{recipe_value})")  # the help wraps inside the value
    assert "--adam_beta1" not in out and "--load_in_4bit" not in out
    assert "every other TrainingArguments option" in " ".join(out.split())
    assert "main_classes/trainer#transformers.TrainingArguments" in out


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text("task: causal_lm\ntrain_file: corpus.txt\noutput_dir: out\nreport_to: none\n" + text)
    (tmp_path / "corpus.txt").write_text("def f():\n    return 1\n")
    return path


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("learnin_rate: 0.1\n", [], ["{file}: learnin_rate: unknown key (did you mean 'learning_rate'?)"]),
        ("max_steps: many\n", [], ["{file}: max_steps: invalid int value: 'many'"]),
        ("", ["--learning_rate", "fast"], ["command line: learning_rate: invalid float value: 'fast'"]),
        (
            "",
            ["--max_stepz", "2"],
            ["command line: max_stepz: unknown option '--max_stepz' (did you mean --max_steps?)"],
        ),
        ("optim: psgd_kron\noptim_args: curvature=newton\n", [], ["{file}: optim_args:", "curvature='newton'"]),
        ("optim: adam\n", [], ["{file}: optim: 'adam' is not an optimizer; choose one of psgd_dense"]),
        ("learning_rates: {psgd_kron: -1}\n", [], ["{file}: learning_rates: psgd_kron=-1 is invalid"]),
        ("task: translation\n", [], ["{file}: task: 'translation' is invalid: expected one of causal_lm"]),
        ("validation_file: missing/*.txt\n", [], ["{file}: validation_file: no file matches", "missing/*.txt"]),
        ("allow_code: true\n", ["--allow_code"], ["{file}: allow_code: command-line only", "pass --allow_code"]),
        ("use_lora: true\n", [], ["{file}: use_lora: unknown key (renamed to 'use_peft', TRL's name)"]),
        (
            "",
            ["--eval_split", "test"],
            ["command line: eval_split: unknown option '--eval_split' (renamed to --dataset_test_split, TRL's name)"],
        ),
        ("lr_scheduler_type: cosin\n", [], ["{file}: lr_scheduler_type: invalid choice: 'cosin' (choose from"]),
        ("dataset_streaming: true\n", [], ["{file}: dataset_streaming: dataset_streaming=True is not supported"]),
    ],
)
def test_bad_recipe_names_the_key_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, overrides: list[str], expected: list[str]
) -> None:
    path = _recipe(tmp_path, text)
    assert main(["train", str(path), *overrides]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("hf-psgd: error: ") and len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err + captured.out
    for fragment in expected:
        assert fragment.format(file=path) in captured.err


def test_unknown_optimizer_for_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(_recipe(tmp_path, "")), "--optims", "psgd_kron,lion"]) == 2
    assert "command line: optims: 'lion' is not an optimizer" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("seeds", "expected"),
    [("0,one", "command line: seeds: 'one' is not an integer"), ("1,1", "command line: seeds: '1,1' repeats a seed")],
)
def test_bad_seeds_for_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str], seeds: str, expected: str) -> None:
    assert main(["compare", str(_recipe(tmp_path, "")), "--seeds", seeds]) == 2
    assert expected in capsys.readouterr().err


def test_seed_stays_a_recipe_key_in_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--seed`` is not taken as an abbreviation of ``--seeds`` (nor ``--optim`` of ``--optims``)."""
    assert main(["compare", str(_recipe(tmp_path, "")), "--seed", "x"]) == 2
    assert "command line: seed: invalid int value: 'x'" in capsys.readouterr().err


def test_module_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    """The real process (``python -m hf_psgd``, as under ``accelerate launch -m``)."""
    missing = tmp_path / "missing.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "hf_psgd", "train", str(missing)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"hf-psgd: error: command line: recipe: file not found: {missing}"
