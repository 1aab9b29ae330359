"""A recipe's raw data: training and evaluation splits from the Hub, a local directory or local files."""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from .arguments import DataArguments
from .errors import RecipeError, first_line

__all__ = ["expand_data_files", "first_rows", "load_splits"]

_DEFAULT_TEST_SPLIT = DataArguments.dataset_test_split
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
        return load_dataset(data.dataset_name, data.dataset_config)
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
    """``(train, eval)``: the ``dataset_train_split`` and the ``dataset_test_split``; at its default
    (``test``), a data set without a test split is evaluated on its ``validation`` split (local
    ``validation_file``), else on ``validation_split_percentage`` percent of the training rows (a
    seeded random hold-out)."""
    splits = _load_named(data) if data.dataset_name else _load_files(data)
    train = _split(splits, "dataset_train_split", data.dataset_train_split)
    if data.dataset_test_split != _DEFAULT_TEST_SPLIT:
        return train, _split(splits, "dataset_test_split", data.dataset_test_split)
    name = next((name for name in (_DEFAULT_TEST_SPLIT, "validation") if name in splits), None)
    if name is not None:
        return train, splits[name]
    held_out = train.train_test_split(test_size=data.validation_split_percentage / 100, seed=seed)
    return held_out["train"], held_out["test"]
