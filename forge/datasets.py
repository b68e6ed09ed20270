"""Evaluation texts that ship inside forge, so a recipe needs nothing beside the repository.

A recipe's `validation.accuracy.dataset` is either one of these names or a path relative to the
recipe. Calibration text is kept apart (`forge.quant.calibration`): never calibrate on these.
"""

from __future__ import annotations

from pathlib import Path

from forge.untrusted import check_utf8, recipe_path

DATA_DIR = Path(__file__).resolve().parent / "data"

# name -> file under forge/data/ (licence, source and sha256 in forge/data/README.md)
BUILTIN_DATASETS = {"wikitext-2": "wikitext-2-raw-v1.test.txt"}


def resolve_dataset(dataset: str, recipe_dir: Path) -> Path:
    """The file a recipe's dataset names: a builtin name, else a path relative to the recipe."""
    if dataset in BUILTIN_DATASETS:
        return DATA_DIR / BUILTIN_DATASETS[dataset]
    return (recipe_dir / dataset).resolve()


def dataset_file(dataset: str, recipe_dir: Path) -> Path:
    """`resolve_dataset`, refused at plan time (exit 2 naming `validation.accuracy.dataset`) unless
    it is a regular UTF-8 text file reached without a symlink out of its folder (`recipe_path`)."""
    if dataset in BUILTIN_DATASETS:
        return resolve_dataset(dataset, recipe_dir)
    path = recipe_path(recipe_dir, dataset, "validation.accuracy.dataset")
    check_utf8(path, "validation.accuracy.dataset")
    return path
