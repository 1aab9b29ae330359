"""Recipes: YAML files that say what to train (task, model, data, optimizer) and how; run by
``hf-psgd train`` (one run, with model card and loss curve) and ``hf-psgd compare`` (one run per
optimizer, with a joint plot and a results table)."""

from .arguments import DataArguments, ModelArguments, RecipeArguments
from .errors import RecipeError
from .history import LossHistory
from .loading import Recipe, load_recipe, recipe_parser
from .runner import RunResult, compare_recipe, format_comparison, train_recipe

__all__ = [
    "DataArguments",
    "LossHistory",
    "ModelArguments",
    "Recipe",
    "RecipeArguments",
    "RecipeError",
    "RunResult",
    "compare_recipe",
    "format_comparison",
    "load_recipe",
    "recipe_parser",
    "train_recipe",
]
