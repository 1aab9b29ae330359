"""Reading a recipe: a YAML mapping of keys, overridden from the command line, into typed arguments.

A recipe key is any field of :class:`~.arguments.RecipeArguments`, :class:`~.arguments.ModelArguments`,
:class:`~.arguments.DataArguments` and the training arguments (``PSGDTrainingArguments``, or
``PSGDSFTConfig`` for ``task: sft``). YAML values are converted exactly as ``HfArgumentParser``
converts the same option typed on the command line (``learning_rate: 3e-3`` and
``--learning_rate 3e-3`` are the same); command-line options come after the file and win.
In the file, relative data paths (``train_file``, ``validation_file``) are relative to the
recipe's folder, and so are model, tokenizer, dataset and metric paths that exist there.

Half precision from the recipe file (``bf16: true``, or TRL's default for ``task: sft``) applies only
where training runs on an accelerator with bf16: a CPU run (no such accelerator, or ``use_cpu``)
trains in fp32 and says so in one line. ``--bf16 true`` on the command line is passed on as given
(transformers then decides: bf16 autocast with ``--use_cpu true``, else its error).

A recipe runs no code of its own unless ``--allow_code`` is given on the command line (a recipe file
cannot set it): without it, a metric that is not bundled and a ``module:function`` model or tokenizer
are refused before anything is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import OptimizerNames
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

from ..integrations.arguments import PSGDTrainingArguments, psgd_optimizer_names
from .arguments import BUILTIN_MODELS, TASKS, DataArguments, ModelArguments, RecipeArguments, parse_learning_rates
from .errors import RecipeError
from .metrics import BUNDLED_METRICS
from .models import is_function_path

__all__ = ["COMMAND_LINE", "Recipe", "load_recipe", "optimizer_names", "recipe_parser"]

COMMAND_LINE = "command line"
_RECIPE_RELATIVE_FILES = ("train_file", "validation_file")
_RECIPE_RELATIVE_IF_PRESENT = ("model_name_or_path", "tokenizer_name_or_path", "dataset_name", "metric")
_ALLOW_CODE = "allow_code"
_ALLOW_CODE_HINT = f"pass --{_ALLOW_CODE} on the command line to run it"
_BF16_KEYS = ("bf16", "bf16_full_eval")
logger = logging.getLogger(__name__)


def optimizer_names() -> list[str]:
    """Every ``optim`` a recipe accepts: PSGD's names and transformers' built-in ones."""
    return psgd_optimizer_names() + [name.value for name in OptimizerNames]


def _training_arguments_class(task: str) -> type[TrainingArguments]:
    if task == "sft":
        from ..integrations.trl import PSGDSFTConfig  # TRL is only needed for sft recipes

        return PSGDSFTConfig
    return PSGDTrainingArguments


class _RecipeParser(HfArgumentParser):
    """``HfArgumentParser`` that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise argparse.ArgumentError(None, message)


def recipe_parser(task: str, prog: str = "hf-psgd train RECIPE") -> HfArgumentParser:
    """The parser of every recipe key for ``task`` (its ``--help`` lists them)."""
    types = (RecipeArguments, ModelArguments, DataArguments, _training_arguments_class(task))
    return _RecipeParser(types, prog=prog, allow_abbrev=False)


@dataclasses.dataclass
class Recipe:
    """A parsed recipe: where it came from and its typed arguments."""

    path: Path
    overrides: list[str]
    recipe: RecipeArguments
    model: ModelArguments
    data: DataArguments
    training: TrainingArguments
    overridden_keys: frozenset[str]

    @property
    def optimizer(self) -> str:
        """The ``optim`` name (transformers turns its built-in names into an enum)."""
        return str(getattr(self.training.optim, "value", self.training.optim))

    @property
    def command(self) -> str:
        """The ``hf-psgd train`` command that reproduces this run."""
        return shlex.join(["hf-psgd", "train", str(self.path), *self.overrides])

    def source_of(self, key: str) -> str:
        """Where ``key`` was set: ``"command line"`` or the recipe file."""
        return COMMAND_LINE if key in self.overridden_keys else str(self.path)

    def locate(self, error: RecipeError) -> RecipeError:
        """``error`` with its source filled in."""
        if error.source is None:
            error.source = self.source_of(error.key)
        return error


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Parse ``path`` with command-line ``overrides`` (``["--max_steps", "2", ...]``).

    Raises :class:`RecipeError` naming the key and the file (or the command line) for an unknown
    key, a bad value, a missing recipe file, or code the recipe would run without ``--allow_code``.
    """
    path = Path(path)
    values = _read_yaml(path)
    overrides = list(overrides)
    early = _parse_early_options(overrides)
    parser = recipe_parser(_task(values, early, path))
    fields = {f.name for dtype in parser.dataclass_types for f in dataclasses.fields(dtype) if f.init}
    _check_known_keys(values, fields, path)
    _apply_learning_rates(values, early, path)
    _resolve_recipe_paths(values, path.parent)

    namespace = _parse(parser, _yaml_to_argv(values), argparse.Namespace(), str(path), fields)
    for key, value in values.items():
        if value is None:
            setattr(namespace, key, None)
    namespace = _parse(parser, overrides, namespace, COMMAND_LINE, fields)
    overridden = frozenset(_option_keys(overrides, fields))
    _bf16_where_supported(namespace, overridden, path)
    built = []
    for dtype in parser.dataclass_types:
        inputs = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(dtype) if f.init}
        try:
            built.append(dtype(**inputs))
        except ValueError as error:
            key = _mentioned_key(str(error), set(values) | overridden) or "value"
            source = COMMAND_LINE if key in overridden else str(path)
            raise RecipeError(key, str(error).removeprefix(f"{key}: "), source) from None
    recipe_args, model_args, data_args, training_args = built
    recipe = Recipe(path, overrides, recipe_args, model_args, data_args, training_args, overridden)
    if not recipe_args.allow_code:
        _refuse_code(recipe)
    return recipe


def _task(values: dict[str, Any], early: argparse.Namespace, path: Path) -> str:
    task = early.task if early.task is not None else values.get("task", RecipeArguments.task)
    if task not in TASKS:
        source = COMMAND_LINE if early.task is not None else str(path)
        raise RecipeError("task", f"{task!r} is invalid: expected one of {', '.join(TASKS)}", source)
    return task


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError("recipe", f"file not found: {path}", COMMAND_LINE)
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError("recipe", f"not valid YAML: {' '.join(str(error).split())}", str(path)) from None
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise RecipeError("recipe", "expected a mapping of keys to values at the top level", str(path))
    return values


def _parse_early_options(overrides: list[str]) -> argparse.Namespace:
    """The command-line options that decide how the rest is parsed."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    for option in ("--task", "--optim", "--learning_rate", "--learning_rates"):
        parser.add_argument(option)
    try:
        return parser.parse_known_args(overrides)[0]
    except argparse.ArgumentError:  # e.g. "--task" without a value: the full parse reports it
        return parser.parse_known_args([])[0]


def _check_known_keys(values: dict[str, Any], fields: set[str], path: Path) -> None:
    for key in values:
        if key == _ALLOW_CODE:
            raise RecipeError(
                key,
                f"command-line only: a recipe cannot allow itself to run code; pass --{_ALLOW_CODE} on the command "
                "line instead",
                str(path),
            )
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(
                key,
                f"unknown key{hint}; keys are the fields of ModelArguments, DataArguments, RecipeArguments and the "
                "training arguments (`hf-psgd train RECIPE --help` lists them)",
                str(path),
            )


def _apply_learning_rates(values: dict[str, Any], early: argparse.Namespace, path: Path) -> None:
    """``learning_rates[optim]`` becomes the learning rate, unless ``--learning_rate`` was given."""
    source = COMMAND_LINE if early.learning_rates is not None else str(path)
    try:
        rates = parse_learning_rates(early.learning_rates if source == COMMAND_LINE else values.get("learning_rates"))
    except ValueError as error:
        raise RecipeError("learning_rates", str(error).removeprefix("learning_rates: "), source) from None
    optim = early.optim if early.optim is not None else values.get("optim")
    if optim is not None and optim not in optimizer_names():
        raise RecipeError(
            "optim",
            f"{optim!r} is not an optimizer; choose one of {', '.join(optimizer_names())}",
            COMMAND_LINE if early.optim is not None else str(path),
        )
    if optim in rates and early.learning_rate is None:
        values["learning_rate"] = rates[optim]


def _bf16_where_supported(namespace: argparse.Namespace, overridden: frozenset[str], path: Path) -> None:
    """bf16 that the command line did not ask for becomes fp32 on a CPU run, with one line saying so."""
    if not namespace.use_cpu and (is_torch_bf16_gpu_available() or is_torch_xla_available()):
        return
    for key in _BF16_KEYS:
        wanted = getattr(namespace, key, False)  # None: TRL's default, bf16 unless fp16
        if key not in overridden and (wanted or (wanted is None and not namespace.fp16)):
            setattr(namespace, key, False)
            logger.warning(
                f"{path}: {key}: no accelerator with bf16 on this run, training in fp32 (a command-line --{key} true "
                "is kept as given)"
            )


def _refuse_code(recipe: Recipe) -> None:
    """A metric that is not bundled (evaluate runs a metric file or Hub metric as Python) and a
    ``module:function`` model or tokenizer (a call) are code: refused (the recipe lacks ``--allow_code``)."""
    metric = recipe.data.metric
    if metric is not None and metric not in BUNDLED_METRICS:
        message = (
            f"{metric!r} is not a bundled metric ({', '.join(BUNDLED_METRICS)}): evaluate would run it as Python "
            f"code; {_ALLOW_CODE_HINT}"
        )
        raise recipe.locate(RecipeError("metric", message))
    for key in ("model_name_or_path", "tokenizer_name_or_path"):
        name = getattr(recipe.model, key)
        if name is not None and is_function_path(name):
            message = (
                f"{name!r} is a module:function call, not a Hub id, a local directory or a built-in model "
                f"({', '.join(BUILTIN_MODELS)}); {_ALLOW_CODE_HINT}"
            )
            raise recipe.locate(RecipeError(key, message))


def _resolve_recipe_paths(values: dict[str, Any], folder: Path) -> None:
    for key in _RECIPE_RELATIVE_FILES:
        value = values.get(key)
        if isinstance(value, str) and "{stdlib}" not in value and not Path(value).is_absolute():
            values[key] = str(folder / value)
    for key in _RECIPE_RELATIVE_IF_PRESENT:
        value = values.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (folder / value).exists():
            values[key] = str(folder / value)


def _yaml_to_argv(values: dict[str, Any]) -> list[str]:
    """The command line that sets ``values`` (``None`` values are set directly, not through argparse)."""
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, list):
            argv += [f"--{key}", *(_as_text(item) for item in value)]
        else:
            argv.append(f"--{key}={_as_text(value)}")
    return argv


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _parse(
    parser: HfArgumentParser, argv: list[str], namespace: argparse.Namespace, source: str, fields: set[str]
) -> argparse.Namespace:
    try:
        namespace, unknown = parser.parse_known_args(argv, namespace=namespace)
    except argparse.ArgumentError as error:
        message = str(error)
        match = re.match(r"argument --(\w+)(?:/[-\w]+)*: (.*)", message, re.DOTALL)
        if match:
            raise RecipeError(match.group(1), match.group(2), source) from None
        raise RecipeError("value", message, source) from None
    if unknown:
        option = next((item for item in unknown if item.startswith("-")), unknown[0])
        key = option.lstrip("-").partition("=")[0]
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        raise RecipeError(key, f"unknown option {option!r}{hint}", source)
    return namespace


def _option_keys(overrides: list[str], fields: set[str]) -> list[str]:
    """The recipe keys that command-line ``overrides`` set (``--no_x`` sets ``x``)."""
    keys = []
    for item in overrides:
        if item.startswith("--"):
            key = item[2:].partition("=")[0].replace("-", "_")
            keys.append(key[3:] if key not in fields and key.startswith("no_") and key[3:] in fields else key)
    return keys


def _mentioned_key(message: str, keys: set[str]) -> str | None:
    """The longest recipe key named in an error message, if any."""
    named = [key for key in keys if re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", message)]
    return max(named, key=len) if named else None
