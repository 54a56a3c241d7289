"""The Dataset tab's content: thumbnails with captions, counts, repeats, bucket histogram, skipped files."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, ImageOps

from app.path_checks import folder_problem
from trainers.config import DEMO_SCHEME
from trainers.dataset import DatasetError, assign_buckets, crop_warnings, scan_dataset
from trainers.paths import DEMO_DATASETS, resolve_dataset_path

THUMBNAIL_SIZE = (192, 192)
MAX_THUMBNAILS = 60  # enough to judge a dataset; thousands would stall the page


@dataclass
class DatasetOverview:
    """What the Dataset tab shows; `problem` is set (and the rest empty) when the folder cannot be read."""

    summary: str = ""
    thumbnails: list[tuple[Image.Image, str]] = field(default_factory=list)
    buckets: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["bucket", "images"]))
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["file", "reason"]))
    paths: list[Path] = field(default_factory=list)  # the image of each thumbnail, in gallery order
    problem: str | None = None


def dataset_root(path: str) -> tuple[Path | None, str | None]:
    """(folder, None) for a usable dataset path (demo:// generated on first use), else (None, problem)."""
    path = path.strip()
    if path.startswith(DEMO_SCHEME):
        if path.removeprefix(DEMO_SCHEME) not in DEMO_DATASETS:
            return None, f"dataset.path: unknown demo dataset {path!r}; available: demo://shapes"
        return resolve_dataset_path(path), None
    problem = folder_problem(path, "dataset.path")
    return (None, problem) if problem else (resolve_dataset_path(path), None)


def dataset_overview(
    path: str,
    caption_extension: str = ".txt",
    resolution: int = 1024,
    max_aspect: float = 2.0,
    no_upscale: bool = True,
    limit: int = MAX_THUMBNAILS,
) -> DatasetOverview:
    """Scan the dataset as the trainer will; returns thumbnails, counts, buckets and skipped files."""
    root, problem = dataset_root(path)
    if root is None:
        return DatasetOverview(problem=problem)
    try:
        scan = scan_dataset(root, caption_extension or ".txt")
        buckets = assign_buckets(scan.items, int(resolution), float(max_aspect), bool(no_upscale))
    except (DatasetError, ValueError) as error:
        return DatasetOverview(problem=f"dataset.path: {error}")
    counts = Counter(f"{w}x{h}" for w, h in buckets)
    repeats = Counter(item.repeats for item in scan.items)
    lines = [
        f"**{len(scan.items)} images** in `{root}`, **{scan.num_samples} samples per epoch**",
        "repeats: " + ", ".join(f"{r}× for {n} images" for r, n in sorted(repeats.items())),
        f"{len(counts)} bucket{'s' if len(counts) != 1 else ''} at resolution {resolution}",
    ]
    if scan.missing_captions:
        lines.append(
            f"{len(scan.missing_captions)} images have no caption (trained on the trigger word only)"
        )
    if scan.skipped:
        lines.append(f"{len(scan.skipped)} files skipped (see below)")
    warnings = scan.warnings + crop_warnings(scan.items, buckets, float(max_aspect))
    lines += [f"⚠ {warning}" for warning in warnings]
    if len(scan.items) > limit:
        lines.append(f"showing the first {limit} images")
    return DatasetOverview(
        summary="\n\n".join(lines),
        thumbnails=[
            (thumbnail(item.path), _caption(item.caption, item.repeats)) for item in scan.items[:limit]
        ],
        buckets=pd.DataFrame(sorted(counts.items(), key=_bucket_order), columns=["bucket", "images"]),
        skipped=pd.DataFrame([(str(p), reason) for p, reason in scan.skipped], columns=["file", "reason"]),
        paths=[item.path for item in scan.items[:limit]],
    )


def thumbnail(path: Path) -> Image.Image:
    """A small RGB copy of the image, rotated as displayed (served from memory, not from its folder)."""
    with Image.open(path) as image:
        copy = ImageOps.exif_transpose(image).convert("RGB")
    copy.thumbnail(THUMBNAIL_SIZE)
    return copy


def _caption(caption: str, repeats: int) -> str:
    text = caption or "(no caption)"
    return f"{text}  ×{repeats}" if repeats > 1 else text


def _bucket_order(item: tuple[str, int]) -> float:
    width, height = (int(v) for v in item[0].split("x"))
    return width / height
