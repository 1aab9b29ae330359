"""A recipe's raw data: training and evaluation splits from the Hub, a local directory or local files."""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from .arguments import DataArguments
from .errors import RecipeError, first_line

__all__ = ["expand_data_files", "first_rows", "load_splits"]

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def expand_data_files(key: str, pattern: str) -> list[str]:
    """The files a ``train_file``/``validation_file`` pattern names (``{stdlib}``: Python's standard
    library folder), sorted; a :class:`RecipeError` if none match."""
    expanded = pattern.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    files = sorted(glob.glob(expanded))
    if not files:
        raise RecipeError(key, f"no file matches {pattern!r}")
    return files


def _load_files(data: DataArguments) -> DatasetDict:
    files = {"train": expand_data_files("train_file", data.train_file)}
    if data.validation_file:
        files["validation"] = expand_data_files("validation_file", data.validation_file)
    builders = {_BUILDERS.get(Path(name).suffix, "text") for names in files.values() for name in names}
    if len(builders) > 1:
        raise RecipeError("train_file", f"mixes file kinds {sorted(builders)}: use one of .jsonl, .csv, .parquet, text")
    (builder,) = builders
    options = {"sample_by": "document"} if builder == "text" else {}  # a text file is one document
    return load_dataset(builder, data_files=files, **options)


def _load_named(data: DataArguments) -> DatasetDict:
    try:
        return load_dataset(data.dataset_name, data.dataset_config_name)
    except (OSError, ValueError) as error:  # DatasetNotFoundError is a FileNotFoundError; offline: ConnectionError
        raise RecipeError("dataset_name", f"cannot load {data.dataset_name!r}: {first_line(error)}") from None


def _split(splits: DatasetDict, key: str, name: str) -> Dataset:
    if name not in splits:
        raise RecipeError(key, f"no split {name!r}; the dataset has {', '.join(splits)}")
    return splits[name]


def first_rows(dataset: Dataset, count: int | None) -> Dataset:
    """The first ``count`` rows (all when ``count`` is ``None``)."""
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def load_splits(data: DataArguments, seed: int) -> tuple[Dataset, Dataset]:
    """``(train, eval)``. The evaluation split is ``eval_split``, else ``validation``, else ``test``,
    else ``validation_split_percentage`` percent of the training rows (a seeded random hold-out)."""
    splits = _load_named(data) if data.dataset_name else _load_files(data)
    train = _split(splits, "train_split", data.train_split)
    if data.eval_split is not None:
        evaluation = _split(splits, "eval_split", data.eval_split)
    elif "validation" in splits or "test" in splits:
        evaluation = splits["validation" if "validation" in splits else "test"]
    else:
        held_out = train.train_test_split(test_size=data.validation_split_percentage / 100, seed=seed)
        train, evaluation = held_out["train"], held_out["test"]
    return train, evaluation
