"""``hf-psgd train RECIPE --help``: the keys of one recipe, with the recipe's own values as defaults.

The optimizer's and the recipe's keys come first, then the model and data keys, then the training
arguments that the recipe sets. The rest (TRL's quantization and rarer LoRA keys, well over a
hundred ``TrainingArguments``) are accepted too; the help names or links them instead of listing them.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .loading import load_recipe, read_yaml

__all__ = ["recipe_help"]

_DOCS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"
_SFT_DOCS = "https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig"
_OPTIMIZER_KEYS = ("optim", "optim_args", "learning_rate")
#: TRL's keys listed only where the recipe sets them.
_RARE_KEYS = (
    "model_revision", "dtype", "lora_target_parameters", "lora_task_type", "use_rslora", "use_dora", "load_in_8bit",
    "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage", "dataset_streaming",
    "ignore_bias_buffers",
)  # fmt: skip
_HELP = {"learning_rate": "The learning rate of the optimizer that runs (its learning_rates entry, if any)"}


def _shown(value: Any) -> str:
    """A value as it is typed on the command line."""
    value = value.value if isinstance(value, enum.Enum) else value
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"  # report_to: none is []
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _fill(text: str) -> str:
    """``text`` wrapped as argparse wraps help, without breaking a link."""
    width = shutil.get_terminal_size().columns - 2
    return textwrap.fill(text, width=width, break_long_words=False, break_on_hyphens=False)


def recipe_help(path: str | Path, overrides: Sequence[str] = (), prog: str = "hf-psgd train RECIPE") -> str:
    """The help of the recipe ``path`` with command-line ``overrides`` (see the module docstring)."""
    recipe = load_recipe(path, overrides)
    given = set(read_yaml(Path(path))) | recipe.overridden_keys
    training = recipe.training

    def keys(arguments: Any, skipped: Sequence[str] = ()) -> list[tuple[Any, str]]:
        names = [f.name for f in dataclasses.fields(arguments) if f.name not in skipped]
        return [(arguments, name) for name in names if name not in _RARE_KEYS or name in given]

    set_by_recipe = [f.name for f in dataclasses.fields(training) if f.name in given and f.name not in _OPTIMIZER_KEYS]
    groups = {
        "optimizer (PSGD's own options go in optim_args)": [
            *((training, key) for key in _OPTIMIZER_KEYS),
            (recipe.recipe, "learning_rates"),
        ],
        "recipe": keys(recipe.recipe, ["learning_rates"]),
        "model (TRL's ModelConfig and more)": keys(recipe.model),
        "data (TRL's ScriptArguments and more)": keys(recipe.data),
        "training arguments set by this recipe": [(training, key) for key in set_by_recipe],
    }
    docs = _DOCS + (f" and (task sft) {_SFT_DOCS}" if recipe.recipe.task == "sft" else "")
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [--key value ...]",
        description=_fill(
            f"The keys of {path} (task {recipe.recipe.task}); each default is the recipe's value (from the file or the "
            "command line). Any key given as --key value overrides the file."
        ),
        epilog=_fill(
            f"Also accepted, as --key value or recipe keys: TRL's {', '.join(_RARE_KEYS)}, and every other "
            f"TrainingArguments option; see {docs}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    for title, entries in groups.items():
        group = parser.add_argument_group(title)
        for arguments, key in entries:
            text = _HELP.get(key) or arguments.__dataclass_fields__[key].metadata.get("help", "")
            if arguments is training and key not in ("optim", "optim_args"):
                text = text.split(". ")[0].rstrip(".")  # transformers' help: its first sentence
            value = getattr(arguments, key)
            if value is not None or "default" not in text:  # else the help says what None means
                text += f" (default: {_shown(value)})"
            group.add_argument(f"--{key}", action="store_true", help=text.replace("%", "%%"))  # shown, not parsed
    return parser.format_help()
