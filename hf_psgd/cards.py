"""Model cards for recipe outputs, in the Hub's format (``huggingface_hub.ModelCard``).

The card has YAML metadata (library, base model, licence, datasets, tags including ``psgd``,
metrics), the optimizer configuration (for PSGD: family, curvature, preconditioner update schedule,
learning rates), the training hyperparameters, the results table and loss-curve image, and the
command that reproduces the run. LoRA outputs get an adapter card (``library_name: peft``, loading
through PEFT). Outside that command, local models, data and the output folder appear by their names
(relative paths as given), not by this machine's absolute paths; the trained model by its
``hub_model_id`` where one is set.
The Jinja template is ``hf_psgd/templates/model_card.md`` (shipped with the package).
"""

from __future__ import annotations

import math
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .integrations.arguments import is_psgd_optimizer_name, psgd_optimizer_kwargs
from .optim import PSGD
from .optim.options import validate_group
from .optim.schedules import validate_schedule

if TYPE_CHECKING:
    from .recipes.arguments import ModelArguments
    from .recipes.loading import Recipe

__all__ = ["MODEL_CARD_TEMPLATE", "BASE_MODEL_FOLDER", "build_model_card", "write_model_card"]

MODEL_CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
#: Where a LoRA run on a model built from a config (no pretrained weights to name) saves that base.
BASE_MODEL_FOLDER = "base_model"

_PIPELINES = {
    "causal_lm": "text-generation",
    "sft": "text-generation",
    "sequence_classification": "text-classification",
}
_AUTO_CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "sft": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
}
_PSGD_SHOWN = ("curvature", "precond_update_prob", "precond_lr", "momentum")
_PSGD_DEFAULTS = {name: default for name, (default, _) in PSGD.option_specs().items()}
_METRIC_LABELS = {"train_loss": "train_loss (mean over the run's steps)"}


def _hub_id(name: str | None) -> str | None:
    """``name`` if it reads as a Hub repository id (not a local path, ``module:function`` or built-in model)."""
    from .recipes.arguments import BUILTIN_MODELS  # here: the recipes package imports this module

    if name is None or name in BUILTIN_MODELS or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _schedule_text(schedule: Any) -> str:
    schedule = validate_schedule(schedule)
    if isinstance(schedule, Mapping):
        flat, decay, floor = schedule["flat_steps"], schedule["decay"], schedule["min_prob"]
        return f"1 for {flat:g} steps, then exp(-{decay:g} (t - {flat:g})), at least {floor:g}"
    return f"constant {schedule:g}"


def _optimizer_rows(recipe: Recipe) -> tuple[str, list[tuple[str, str]]]:
    """A sentence about the optimizer and its settings as table rows."""
    args = recipe.training
    optimizer = recipe.optimizer
    rows = [("optimizer", f"`{optimizer}`")]
    if is_psgd_optimizer_name(optimizer):
        options = psgd_optimizer_kwargs(optimizer, args.optim_args, args.learning_rate)
        settings = {**_PSGD_DEFAULTS, **options}
        validate_group(settings)  # resolves the curvature's defaults (lr, precond_lr, damping)
        rows += [
            ("preconditioner family", f"`{settings['preconditioner']}`"),
            ("curvature", f"`{settings['curvature']}`"),
            ("preconditioner update probability", _schedule_text(settings["precond_update_prob"])),
            ("preconditioner fit step (precond_lr)", f"{settings['precond_lr']:g}"),
            ("momentum", f"{settings['momentum']:g}"),
        ]
        others = {key: value for key, value in options.items() if key not in (*_PSGD_SHOWN, "lr", "preconditioner")}
        if others:
            rows.append(("other PSGD options", ", ".join(f"{key}={value}" for key, value in others.items())))
        summary = (
            f"Trained with PSGD (`{optimizer}`: a Lie-group preconditioner of family `{settings['preconditioner']}` "
            f"fitted online from `{settings['curvature']}` curvature), selected by name through "
            "`PSGDTrainingArguments` (`optim` and `optim_args`)."
        )
    else:
        summary = f"This run is a baseline trained with `{optimizer}` (no PSGD)."
    rows.append(("learning rate", f"{args.learning_rate:g}"))
    if recipe.recipe.learning_rates:
        rates = ", ".join(f"{name}: {rate:g}" for name, rate in recipe.recipe.learning_rates.items())
        rows.append(("recipe learning rates", rates))
    rows += [
        (
            "learning-rate schedule",
            f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}, warmup {args.warmup_steps:g} steps",
        ),
        ("weight decay", f"{args.weight_decay:g}"),
    ]
    return summary, rows


def _hyperparameter_rows(recipe: Recipe) -> list[tuple[str, str]]:
    args = recipe.training
    rows = [
        (
            "max steps" if args.max_steps > 0 else "epochs",
            str(args.max_steps if args.max_steps > 0 else args.num_train_epochs),
        ),
        ("batch size per device", str(args.per_device_train_batch_size)),
        ("processes", str(args.world_size)),
        ("gradient accumulation steps", str(args.gradient_accumulation_steps)),
        ("max grad norm", f"{args.max_grad_norm:g}"),
        ("seed", str(args.seed)),
    ]
    if recipe.model.use_peft:
        targets = recipe.model.lora_target_modules or "PEFT's default for the model"  # TRL: one name as a str
        targets = targets if isinstance(targets, str) else ", ".join(targets)
        rows.append(("LoRA", f"r={recipe.model.lora_r}, alpha={recipe.model.lora_alpha}, targets: {targets}"))
    return rows


def _results_table(records: Sequence[Mapping[str, float]]) -> str:
    by_step: dict[int, dict[str, float]] = {}
    for record in records:
        by_step.setdefault(int(record["step"]), {}).update(record)
    metric_keys = sorted(
        {key for row in by_step.values() for key in row if key.startswith("eval_") and key != "eval_loss"}
    )
    header = [
        "step",
        "training loss",
        "validation loss",
        *(key.removeprefix("eval_") for key in metric_keys),
        "time (s)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for step, row in sorted(by_step.items()):
        cells = [str(step), _number(row.get("loss")), _number(row.get("eval_loss"))]
        cells += [_number(row.get(key)) for key in metric_keys] + [f"{row['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _local(path: str) -> str:
    """A local path as a reader can use it: as given when relative, else its last component."""
    return path if not Path(path).is_absolute() else Path(path).name


def _repo(recipe: Recipe) -> str:
    """Where the trained model is loaded from: its Hub id, else the output folder (see :func:`_local`)."""
    return recipe.training.hub_model_id or _local(recipe.training.output_dir)


def _usage(recipe: Recipe, adapter: bool, repo: str) -> str:
    auto = _AUTO_CLASSES[recipe.recipe.task]
    lines = [f"from transformers import AutoTokenizer, {auto}"]
    if not adapter:
        return "\n".join(
            [
                *lines,
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                f'model = {auto}.from_pretrained("{repo}")',
            ]
        )
    local_base = recipe.model.model_name_or_path and _local(recipe.model.model_name_or_path)
    base = _hub_id(recipe.model.base_model) or local_base or f"{repo}/{BASE_MODEL_FOLDER}"
    return "\n".join(
        [
            *lines,
            "from peft import PeftModel",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            f'model = PeftModel.from_pretrained({auto}.from_pretrained("{base}"), "{repo}")',
        ]
    )


def _versions(packages: Sequence[str]) -> str:
    found = []
    for package in packages:
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def _files_text(recipe: Recipe) -> str:
    """The training files: relative to the standard library (``{stdlib}``) or the recipe's folder, else by name."""
    from .recipes.data import expand_data_files  # here: the recipes package imports this module

    pattern = recipe.data.train_file
    stdlib = "{stdlib}" in pattern
    root = Path(sysconfig.get_paths()["stdlib"] if stdlib else recipe.path.parent).resolve()
    files = [Path(name).resolve() for name in expand_data_files("train_file", pattern)]
    names = [f"`{file.relative_to(root) if file.is_relative_to(root) else file.name}`" for file in files]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if stdlib:
        listing = shown if len(files) == 1 else f"{len(files)} files: {shown}"
        return f"the source of Python {sys.version_info.major}.{sys.version_info.minor}'s standard library ({listing})"
    return shown if len(files) == 1 else f"{len(files)} local files ({shown})"


def _base_licence(model: ModelArguments) -> str | None:
    """The licence in the metadata of a local or built-in base model's ``README.md``, if any."""
    from .recipes.models import is_function_path, resolve_model_path

    name = model.model_name_or_path
    if name is None or is_function_path(name):
        return None
    readme = Path(resolve_model_path("model_name_or_path", name)) / "README.md"
    return (metadata_load(readme) or {}).get("license") if readme.is_file() else None


def _summary(recipe: Recipe, base_model: str | None, dataset: str | None) -> str:
    """One sentence: what was trained from what, on which data, with which recipe."""
    model, data = recipe.model, recipe.data
    if base_model:
        origin = f"a fine-tuned version of [{base_model}](https://huggingface.co/{base_model})"
    elif model.model_name_or_path:
        origin = f"a fine-tuned version of the local model `{_local(model.model_name_or_path)}`"
    else:
        origin = f"a `{model.model_type}` model built from a config and trained from scratch"
    if dataset:
        source = f"[{dataset}](https://huggingface.co/datasets/{dataset})"
    elif data.dataset_name:
        source = f"the local dataset `{_local(data.dataset_name)}`"
    else:
        source = _files_text(recipe)
    subject = f"LoRA adapters for {origin}" if model.use_peft else origin[0].upper() + origin[1:]
    return f"{subject}, task `{recipe.recipe.task}`, trained on {source} with the hf_psgd recipe `{recipe.path.name}`."


def build_model_card(
    recipe: Recipe,
    final_metrics: Mapping[str, float],
    records: Sequence[Mapping[str, float]],
    loss_curve: str | None = None,
) -> ModelCard:
    """The card of a finished recipe run (see the module docstring). ``records`` are the loss-history
    records, ``loss_curve`` the image's path relative to the output directory."""
    model, data, task = recipe.model, recipe.data, recipe.recipe.task
    adapter = model.use_peft
    psgd = is_psgd_optimizer_name(recipe.optimizer)
    base_model = _hub_id(model.base_model) or _hub_id(model.model_name_or_path)
    dataset = _hub_id(data.dataset_name)
    tags = ["hf-psgd", *(["psgd"] if psgd else []), recipe.optimizer, task]
    tags += (["lora", "peft"] if adapter else []) + (["trl", "sft"] if task == "sft" else [])
    metric_names = [
        "loss",
        *(
            key.removeprefix("eval_")
            for key in final_metrics
            if key.startswith("eval_") and key not in ("eval_loss", "eval_perplexity")
        ),
    ]
    card_data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        base_model=base_model,
        license=model.license or _base_licence(model),
        datasets=[dataset] if dataset else None,
        tags=tags,
        metrics=metric_names,
        pipeline_tag=_PIPELINES[task],
    )
    repo = _repo(recipe)
    name = repo.rpartition("/")[2] if recipe.training.hub_model_id else f"{recipe.path.stem}-{recipe.optimizer}"
    optimizer_summary, optimizer_rows = _optimizer_rows(recipe)
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=name,
        summary=_summary(recipe, base_model, dataset),
        usage=_usage(recipe, adapter, repo),
        optimizer_summary=optimizer_summary,
        optimizer_rows=optimizer_rows,
        hyperparameter_rows=_hyperparameter_rows(recipe),
        loss_curve=loss_curve,
        results_table=_results_table(records),
        final_metrics=[(_METRIC_LABELS.get(key, key), _number(value)) for key, value in final_metrics.items()],
        command=recipe.command,
        versions=_versions(
            ["transformers", "torch", *(["peft"] if adapter else []), *(["trl"] if task == "sft" else [])]
        ),
    )


def write_model_card(
    recipe: Recipe,
    final_metrics: Mapping[str, float],
    records: Sequence[Mapping[str, float]],
    loss_curve: str | None = None,
) -> Path:
    """Write :func:`build_model_card` to ``README.md`` in the run's output directory."""
    path = Path(recipe.training.output_dir) / "README.md"
    build_model_card(recipe, final_metrics, records, loss_curve).save(path)
    return path
