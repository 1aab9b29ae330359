"""Reading a recipe: a YAML mapping of keys, overridden from the command line, into typed arguments.

A recipe key is any field of :class:`~.arguments.RecipeArguments`, :class:`~.arguments.ModelArguments`,
:class:`~.arguments.DataArguments` and the training arguments (``PSGDTrainingArguments``, or
``PSGDSFTConfig`` for ``task: sft``), parsed by TRL's ``TrlParser``: the file's values become the
parser's defaults, converted as the same option typed on the command line would be, and
command-line options win. Relative data paths (``train_file``, ``validation_file``) are relative to
the recipe's folder, and so are model, tokenizer, dataset and metric paths that exist there.

Half precision from the recipe file (``bf16: true``, or TRL's default for ``task: sft``) applies only
where training runs on an accelerator with bf16: a CPU run trains in fp32 and says so in one line;
``--bf16 true`` on the command line is passed on as given.

A recipe runs no code of its own unless ``--allow_code`` is given on the command line (a recipe file
cannot set it): without it an evaluate ``metric`` and a ``module:function`` model or tokenizer are
refused before anything is loaded.
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
from transformers import TrainingArguments
from transformers.training_args import OptimizerNames
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
from trl import TrlParser

from ..integrations.arguments import PSGDTrainingArguments, psgd_optimizer_names
from .arguments import BUILTIN_MODELS, TASKS, DataArguments, ModelArguments, RecipeArguments
from .errors import RecipeError
from .models import is_function_path

__all__ = ["COMMAND_LINE", "Recipe", "load_recipe", "optimizer_names", "recipe_parser"]

COMMAND_LINE = "command line"
_RECIPE_RELATIVE_FILES = ("train_file", "validation_file")
_RECIPE_RELATIVE_IF_PRESENT = ("model_name_or_path", "tokenizer_name_or_path", "dataset_name", "metric")
#: Keys of hf_psgd 0.2 that TRL's configs name differently.
_RENAMED = {
    "use_lora": "use_peft",
    "dataset_config_name": "dataset_config",
    "train_split": "dataset_train_split",
    "eval_split": "dataset_test_split",
}
_ALLOW_CODE_HINT = "pass --allow_code on the command line to run it"
logger = logging.getLogger(__name__)


def optimizer_names() -> list[str]:
    """Every ``optim`` a recipe accepts: PSGD's names and transformers' built-in ones."""
    return psgd_optimizer_names() + [name.value for name in OptimizerNames]


class _RecipeParser(TrlParser):
    """``TrlParser`` that raises instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise argparse.ArgumentError(None, message)


def recipe_parser(task: str, prog: str = "hf-psgd train RECIPE") -> TrlParser:
    """The parser of every recipe key for ``task``."""
    if task == "sft":
        from ..integrations.trl import PSGDSFTConfig as training  # TRL's trainer only for sft recipes
    else:
        training = PSGDTrainingArguments
    return _RecipeParser((RecipeArguments, ModelArguments, DataArguments, training), prog=prog, allow_abbrev=False)


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
    path, overrides = Path(path), list(overrides)
    values = read_yaml(path)
    task = _option_value(overrides, "task") or values.get("task", RecipeArguments.task)
    if task not in TASKS:
        where = COMMAND_LINE if _option_value(overrides, "task") else str(path)
        raise RecipeError("task", f"{task!r} is invalid: expected one of {', '.join(TASKS)}", where)
    parser = recipe_parser(task)
    fields = {f.name for dtype in parser.dataclass_types for f in dataclasses.fields(dtype) if f.init}
    _check_keys(values, fields, path)
    _resolve_recipe_paths(values, path.parent)
    overridden = frozenset(_option_keys(overrides, fields))
    given = _Given(set(values) | overridden, overridden, str(path))
    parser.set_defaults_with_config(**{key: _as_text(value) for key, value in values.items()})
    namespace = _parse(parser, overrides, fields, given)
    _bf16_where_supported(namespace, overridden, path)
    if namespace.optim not in optimizer_names():
        message = f"{namespace.optim!r} is not an optimizer; choose one of {', '.join(optimizer_names())}"
        raise RecipeError("optim", message, given.source("optim"))
    recipe_args, model_args, data_args = (given.build(dtype, namespace) for dtype in parser.dataclass_types[:3])
    if namespace.optim in recipe_args.learning_rates and "learning_rate" not in overridden:
        namespace.learning_rate = recipe_args.learning_rates[namespace.optim]
    training_args = given.build(parser.dataclass_types[3], namespace)
    recipe = Recipe(path, overrides, recipe_args, model_args, data_args, training_args, overridden)
    if not recipe_args.allow_code:
        _refuse_code(recipe)
    return recipe


@dataclasses.dataclass
class _Given:
    """The keys a recipe run sets (file or command line) and where each came from."""

    keys: set[str]
    overridden: frozenset[str]
    path: str

    def source(self, key: str) -> str:
        return COMMAND_LINE if key in self.overridden else self.path

    def build(self, dtype: type, namespace: argparse.Namespace) -> Any:
        """``dtype`` from the parsed values; a ``ValueError`` of its checks becomes a ``RecipeError``
        naming the longest given key in its message."""
        try:
            return dtype(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(dtype) if f.init})
        except ValueError as error:
            named = [key for key in self.keys if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", str(error))]
            key = max(named, key=len) if named else "value"
            raise RecipeError(key, str(error).removeprefix(f"{key}: "), self.source(key)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    """The recipe file's mapping of keys to values."""
    if not path.is_file():
        raise RecipeError("recipe", f"file not found: {path}", COMMAND_LINE)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError("recipe", f"not valid YAML: {' '.join(str(error).split())}", str(path)) from None
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise RecipeError("recipe", "expected a mapping of keys to values at the top level", str(path))
    return values


def _option_value(overrides: list[str], key: str) -> str | None:
    """The last value of ``--key value`` or ``--key=value`` in ``overrides``."""
    value = None
    for index, item in enumerate(overrides):
        if item == f"--{key}" and index + 1 < len(overrides):
            value = overrides[index + 1]
        elif item.startswith(f"--{key}="):
            value = item.partition("=")[2]
    return value


def _hint(key: str, fields: set[str], form: str) -> str:
    """What to add to "unknown key": its new name, or the closest known key written as ``form``."""
    if key in _RENAMED:
        return f" (renamed to {form.format(_RENAMED[key])}, TRL's name)"
    close = difflib.get_close_matches(key, fields, n=1)
    return f" (did you mean {form.format(close[0])}?)" if close else ""


def _check_keys(values: dict[str, Any], fields: set[str], path: Path) -> None:
    if "allow_code" in values:
        raise RecipeError(
            "allow_code",
            "command-line only: a recipe cannot allow itself to run code; pass --allow_code on the command line "
            "instead",
            str(path),
        )
    for key in values:
        if key not in fields:
            hint = _hint(key, fields, "{!r}")
            raise RecipeError(key, f"unknown key{hint}; `hf-psgd train RECIPE --help` lists the keys", str(path))


def _bf16_where_supported(namespace: argparse.Namespace, overridden: frozenset[str], path: Path) -> None:
    """bf16 that the command line did not ask for becomes fp32 on a CPU run, with one line saying so."""
    if not namespace.use_cpu and (is_torch_bf16_gpu_available() or is_torch_xla_available()):
        return
    for key in ("bf16", "bf16_full_eval"):
        wanted = getattr(namespace, key, False)  # None: TRL's default, bf16 unless fp16
        if key not in overridden and (wanted or (wanted is None and not namespace.fp16)):
            setattr(namespace, key, False)
            logger.warning(
                f"{path}: {key}: no accelerator with bf16 on this run, training in fp32 (a command-line --{key} true "
                "is kept as given)"
            )


def _refuse_code(recipe: Recipe) -> None:
    """An evaluate ``metric`` (a metric file or Hub metric is Python that evaluate runs) and a
    ``module:function`` model or tokenizer (a call) are code: refused without ``--allow_code``."""
    metric = recipe.data.metric
    if metric is not None:
        message = f"{metric!r} is an evaluate metric, which runs as Python code (the defaults need none); "
        raise recipe.locate(RecipeError("metric", message + _ALLOW_CODE_HINT))
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


def _as_text(value: Any) -> Any:
    """A YAML value as the command line would give it (argparse converts a text default with the
    option's type); lists item by item, ``None`` as is."""
    if isinstance(value, list):
        return [_as_text(item) for item in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    return value if value is None else str(value)


def _parse(parser: TrlParser, overrides: list[str], fields: set[str], given: _Given) -> argparse.Namespace:
    try:
        namespace, unknown = parser.parse_known_args(overrides)
    except argparse.ArgumentError as error:
        match = re.match(r"argument --(\w+)(?:/[-\w]+)*: (.*)", str(error), re.DOTALL)
        key, message = match.groups() if match else ("value", str(error))
        raise RecipeError(key, message, given.source(key)) from None
    if unknown:
        option = next((item for item in unknown if item.startswith("-")), unknown[0])
        key = option.lstrip("-").partition("=")[0]
        raise RecipeError(key, f"unknown option {option!r}{_hint(key, fields, '--{}')}", COMMAND_LINE)
    for action in parser._actions:  # argparse checks the choices of command-line values only
        value = getattr(namespace, action.dest, None)
        if action.choices and action.dest in given.keys and value is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise RecipeError(
                action.dest, f"invalid choice: {value!r} (choose from {choices})", given.source(action.dest)
            )
    return namespace


def _option_keys(overrides: list[str], fields: set[str]) -> list[str]:
    """The recipe keys that command-line ``overrides`` set (``--no_x`` sets ``x``)."""
    keys = [item[2:].partition("=")[0].replace("-", "_") for item in overrides if item.startswith("--")]
    return [key[3:] if key not in fields and key.startswith("no_") and key[3:] in fields else key for key in keys]
