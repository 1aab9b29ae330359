"""Recipes: YAML files that say what to train (task, model, data, optimizer) and how; run by
``hf-psgd train`` (one run, with model card and loss curve) and ``hf-psgd compare`` (one run per
optimizer, with a joint plot and a results table)."""

from .arguments import DataArguments, ModelArguments, RecipeArguments
from .errors import RecipeError
from .loading import Recipe, load_recipe, recipe_parser
from .runner import RunResult, compare_recipe, format_comparison, loss_records, train_recipe

__all__ = [
    "DataArguments",
    "ModelArguments",
    "Recipe",
    "RecipeArguments",
    "RecipeError",
    "RunResult",
    "compare_recipe",
    "format_comparison",
    "load_recipe",
    "loss_records",
    "recipe_parser",
    "train_recipe",
]
