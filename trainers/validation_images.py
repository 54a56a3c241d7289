"""Which images a run validates on: a fraction of the dataset held out with a fixed seed, or the folder
`dataset.validation` names (laid out like the dataset). Imports no torch: `check` reads them here;
trainers/validation.py computes the validation loss on them.
"""

from __future__ import annotations

import random

from trainers.config import DatasetConfig
from trainers.dataset import DatasetError, ImageItem, scan_dataset
from trainers.paths import resolve_dataset_path

HOLD_OUT_SEED = 5_318_008  # which images a fraction holds out: fixed, so runs with other seeds compare


def split_dataset(dataset: DatasetConfig, items: list[ImageItem]) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training items, held-out items) for a fraction in `dataset.validation`; (items, []) otherwise.

    Raises DatasetError when the fraction leaves no image on one side."""
    fraction = dataset.validation
    if not isinstance(fraction, float):
        return items, []
    count = round(fraction * len(items))
    if count < 1 or count >= len(items):
        raise DatasetError(
            f"dataset.validation: holding out {fraction} of {len(items)} images leaves "
            f"{'no validation image' if count < 1 else 'nothing to train on'}; "
            f"{'raise the fraction' if count < 1 else 'lower the fraction'} or give a folder of validation images"
        )
    order = sorted(range(len(items)), key=lambda i: str(items[i].path))
    held = set(random.Random(HOLD_OUT_SEED).sample(order, count))
    return [it for i, it in enumerate(items) if i not in held], [
        it for i, it in enumerate(items) if i in held
    ]


def validation_items(dataset: DatasetConfig, held_out: list[ImageItem]) -> list[ImageItem]:
    """The validation images: the held-out ones, or those of the `dataset.validation` folder."""
    if not isinstance(dataset.validation, str):
        return held_out
    scan = scan_dataset(resolve_dataset_path(dataset.validation), dataset.caption_extension)
    return scan.items


def check_validation(dataset: DatasetConfig, items: list[ImageItem]) -> tuple[list[str], str]:
    """(problems, summary line) of the validation images, for `check`; ([], "") without validation."""
    if dataset.validation is None:
        return [], ""
    try:
        _, held_out = split_dataset(dataset, items)
        validation = validation_items(dataset, held_out)
    except DatasetError as error:
        return [
            str(error) if str(error).startswith("dataset.validation") else f"dataset.validation: {error}"
        ], ""
    if not validation:
        return [
            f"dataset.validation: no usable image in {dataset.validation}; add images with captions there"
        ], ""
    if held_out:
        return [], f"validation: {len(held_out)} of the {len(items)} images held out (not trained on)"
    return [], f"validation: {len(validation)} images in {dataset.validation}"
