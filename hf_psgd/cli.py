"""``hf-psgd``: run recipes from the command line.

    hf-psgd train RECIPE.yaml [--key value ...]
    hf-psgd compare RECIPE.yaml [--optims psgd_kron,adamw_torch] [--seeds 0,1,2] [--key value ...]
    accelerate launch --config_file recipes/accelerate_2proc_cpu.yaml -m hf_psgd train RECIPE.yaml --use_cpu true

Any recipe key can be overridden as ``--key value`` (``HfArgumentParser`` conventions);
``hf-psgd train RECIPE.yaml --help`` lists that recipe's keys with its values as defaults. A bad
recipe (unknown key, missing file, bad value) ends with one line on stderr naming the file and the
key, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]

_DESCRIPTIONS = {
    "train": "Train with a recipe; write the model, its model card (README.md) and loss curve to output_dir.",
    "compare": "Run a recipe once per optimizer (same seed, data and steps) into OUTPUT/<optimizer> (OUTPUT: "
    "--output_dir, else the recipe's output_dir + _compare); write loss_curves.png (train and eval loss against "
    "steps and time) and results.md (final metrics and time). "
    "With --seeds, once per optimizer and seed, and results.md gives the mean and standard deviation.",
}


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="hf-psgd", description="Recipes for the PSGD optimizer on the Hugging Face stack."
    )
    commands = parser.add_subparsers(dest="command", metavar="{train,compare}")
    subparsers = {}
    for name, description in _DESCRIPTIONS.items():
        sub = commands.add_parser(
            name,
            help=description.split(";")[0].split(" (")[0],
            description=description,
            add_help=False,
            allow_abbrev=False,  # --seed and --optim are recipe keys, not abbreviations of --seeds and --optims
            usage=f"hf-psgd {name} RECIPE.yaml{' [--optims NAMES] [--seeds SEEDS]' if name == 'compare' else ''}"
            " [--key value ...]",
            epilog="Any recipe key can be given as --key value and overrides the file; "
            f"`hf-psgd {name} RECIPE.yaml --help` lists that recipe's keys with its values.",
        )
        sub.add_argument("recipe", nargs="?", help="the recipe YAML file (see recipes/)")
        sub.add_argument("-h", "--help", action="store_true", help="show this help (with RECIPE: its keys and values)")
        if name == "compare":
            sub.add_argument(
                "--optims",
                help="comma-separated optimizer names (default: the recipe's learning_rates names, "
                "else psgd_kron,adamw_torch)",
            )
            sub.add_argument(
                "--seeds",
                help="comma-separated integer seeds: run every optimizer once per seed and report mean ± std "
                "(default: one run at the recipe's seed)",
            )
        subparsers[name] = sub
    return parser, subparsers


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-psgd``; returns the exit code."""
    parser, subparsers = _parser()
    args, overrides = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.help and args.recipe is None:
        subparsers[args.command].print_help()
        return 0
    if args.recipe is None:
        subparsers[args.command].print_usage(sys.stderr)
        print(f"hf-psgd {args.command}: error: the recipe file is required", file=sys.stderr)
        return 2

    from .distributed import end_multiprocess_run
    from .recipes import RecipeError, compare_recipe, format_comparison, load_recipe, train_recipe
    from .recipes.usage import recipe_help

    try:
        if args.help:
            print(recipe_help(args.recipe, overrides, prog=f"hf-psgd {args.command} RECIPE"), end="")
        elif args.command == "train":
            result = train_recipe(load_recipe(args.recipe, overrides))
            figures = ", ".join(f"{key} {value:.4g}" for key, value in result.metrics.items())
            print(f"hf-psgd train: {figures}; model, model card and loss curve in {result.output_dir}")
        else:
            optimizers = [name.strip() for name in args.optims.split(",") if name.strip()] if args.optims else None
            seeds = _seeds(args.seeds)
            results = compare_recipe(args.recipe, optimizers, overrides, seeds)
            output = results[0].output_dir.parent if seeds is None else results[0].output_dir.parents[1]
            print(format_comparison(results))
            print(f"hf-psgd compare: loss_curves.png and results.md in {output}")
    except RecipeError as error:
        print(f"hf-psgd: error: {error}", file=sys.stderr)
        return 2
    end_multiprocess_run()
    return 0


def _seeds(text: str | None) -> list[int] | None:
    """``--seeds 0,1,2`` as a list of distinct ints; ``RecipeError`` naming a bad entry."""
    from .recipes import RecipeError
    from .recipes.loading import COMMAND_LINE

    if text is None:
        return None
    seeds = []
    for entry in text.split(","):
        try:
            seeds.append(int(entry))
        except ValueError:
            raise RecipeError(
                "seeds",
                f"{entry.strip()!r} is not an integer; give comma-separated integers such as 0,1,2",
                COMMAND_LINE,
            ) from None
    if len(set(seeds)) != len(seeds):
        raise RecipeError("seeds", f"{text!r} repeats a seed; give distinct seeds", COMMAND_LINE)
    return seeds
