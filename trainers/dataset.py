"""Training images on disk: scanning, captions, aspect-ratio buckets and loading to tensors.

No model is loaded here, and scanning imports no torch (nor numpy): `check` scans in a fraction of a
second; loading to tensors imports them. Conventions follow kohya sd-scripts (``N_concept`` repeat folders, side-file
captions, comma-separated tags with ``keep_tokens``) and the Hugging Face imagefolder ``metadata.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from trainers.config import MAX_ASPECT

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp"})
METADATA_FILE = "metadata.jsonl"
CROP_MODES = ("center", "random")

_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
_PREFIXED_FOLDER = re.compile(r"^([^_]+)_(.+)$")  # kohya's "<repeats>_<concept>" shape with any prefix
# Tried in order when a caption file is not UTF-8; latin-1 decodes any byte, so the last always works.
CAPTION_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")
# Below this share of an image kept by its bucket's crop, the scan warns (max_aspect 2 keeps >= 50%
# of any image up to 4:1).
MIN_KEPT_FRACTION = 0.5
# Pillow's 16-bit and 32-bit integer greyscale modes (16-bit PNGs open as I;16 or I): 0..65535.
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# EXIF orientations 5-8 rotate by 90 degrees, so the displayed image has width and height swapped.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


class DatasetError(ValueError):
    """The dataset folder is missing, not a folder, holds no usable image, or has a malformed metadata file."""


@dataclass(frozen=True)
class ImageItem:
    """One usable training image. ``width``/``height`` are as displayed (after EXIF rotation)."""

    path: Path
    caption: str
    repeats: int
    width: int
    height: int


@dataclass
class DatasetScan:
    """Result of ``scan_dataset``: usable images, skipped files with reasons, images lacking a caption, and
    warnings about what was read in a way the user may not expect (one line each, naming the file)."""

    items: list[ImageItem]
    skipped: list[tuple[Path, str]]
    missing_captions: list[Path]
    warnings: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        """Return the number of samples in one epoch (each image counted ``repeats`` times)."""
        return sum(item.repeats for item in self.items)


@dataclass
class LoadedImage:
    """A bucket-sized training image plus the values SDXL's micro-conditioning (``add_time_ids``) needs."""

    pixels: torch.Tensor  # float32, (3, H, W), in [-1, 1]
    original_size: tuple[int, int]  # (height, width) of the image file, after EXIF rotation
    crop_top_left: tuple[int, int]  # (top, left) of the crop inside the resized image
    target_size: tuple[int, int]  # (height, width) of ``pixels``


# --------------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------------


class _UnreadableImage(Exception):
    """Internal: carries the human-readable reason an image file was skipped."""


def scan_dataset(root: Path, caption_extension: str = ".txt") -> DatasetScan:
    """Return every usable image under ``root`` (recursively) with its caption, repeats and size.

    - Captions come from ``<image stem><caption_extension>`` next to the image; a ``metadata.jsonl`` in a
      folder (``{"file_name": ..., "text": ...}`` per line, names relative to that folder) overrides them.
      Images without any caption get "" and are listed in ``missing_captions``.
    - An image inside a folder named ``N_concept`` (the nearest such folder below ``root``) is repeated N
      times per epoch, others once. As in kohya, ``0_concept`` folders are left out; a top-level folder
      named like ``abc_concept`` (not a number) is used once. Both are named in ``warnings``.
    - A caption file that is not UTF-8 is read with the first of CAPTION_ENCODINGS that decodes it, with
      a warning naming the file and the encoding used.
    - Unreadable, truncated or empty files are listed in ``skipped`` with a reason instead of raising.
    - Hidden files and folders (name starting with ".") are ignored; symlinked folders are followed once.

    Raises DatasetError naming ``root`` if it does not exist, is not a folder, or has no usable image,
    and naming the file and line for a malformed ``metadata.jsonl``.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"Dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"Dataset path {root} is not a folder")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension

    image_paths, metadata_files = _walk(root)
    metadata_captions: dict[Path, str] = {}
    # Shallow files first, so a metadata.jsonl nearer to the image wins.
    for metadata_file in sorted(metadata_files, key=lambda p: len(p.parts)):
        metadata_captions.update(_read_metadata(metadata_file))

    items: list[ImageItem] = []
    skipped: list[tuple[Path, str]] = []
    missing: list[Path] = []
    warnings: dict[str, None] = {}  # ordered set: one warning per folder
    left_out: Counter[Path] = Counter()
    for path in image_paths:
        repeats, folder_warning = _repeats_for(path, root)
        if folder_warning:
            warnings[folder_warning] = None
        if repeats == 0:
            left_out[path.parent] += 1
            continue
        try:
            width, height = _probe_image(path)
        except _UnreadableImage as exc:
            skipped.append((path, str(exc)))
            continue
        caption = metadata_captions.get(path)
        if caption is None:
            caption, caption_warning = _read_side_caption(path, caption_extension)
            if caption_warning:
                warnings[caption_warning] = None
        if not caption:
            missing.append(path)
        items.append(ImageItem(path, caption or "", repeats, width, height))

    notes = [_left_out_warning(folder, count) for folder, count in left_out.items()] + list(warnings)
    if not items:
        raise DatasetError(_no_images_message(root, skipped, notes))
    return DatasetScan(items=items, skipped=skipped, missing_captions=missing, warnings=notes)


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """Return (image files, metadata.jsonl files) under ``root`` in sorted order, skipping hidden entries."""
    images: list[Path] = []
    metadata: list[Path] = []
    # Symlinked folders are followed (``ln -s ~/photos 10_me`` is a common way to build a dataset); the
    # set of real paths already visited stops symlink loops.
    visited = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Pruning in place stops os.walk from descending into .cache, .ipynb_checkpoints, loops and the like.
        kept = []
        for name in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, name))
            if not name.startswith(".") and real not in visited:
                visited.add(real)
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if name == METADATA_FILE:
                metadata.append(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path)
    return images, metadata


def _read_metadata(metadata_file: Path) -> dict[Path, str]:
    """Return {image path: caption} from one ``metadata.jsonl``; raise DatasetError on a malformed line."""
    captions: dict[Path, str] = {}
    try:
        text = metadata_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        # JSON Lines is UTF-8 by definition: guessing here could silently pair wrong captions
        raise DatasetError(
            f"{metadata_file}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from exc
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{metadata_file}:{lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise DatasetError(f'{metadata_file}:{lineno}: expected an object with a "file_name" string')
        caption = record.get("text", "")
        if not isinstance(caption, str):
            raise DatasetError(f'{metadata_file}:{lineno}: "text" must be a string')
        # normpath (not resolve) so keys match the paths os.walk produces, symlinks included.
        image_path = Path(os.path.normpath(metadata_file.parent / record["file_name"]))
        captions[image_path] = _clean_caption(caption)
    return captions


def _read_side_caption(image_path: Path, caption_extension: str) -> tuple[str | None, str | None]:
    """Return (cleaned caption or None if there is no side file, warning if it was not UTF-8)."""
    caption_path = image_path.with_suffix(caption_extension)
    if not caption_path.is_file():
        return None, None
    raw = caption_path.read_bytes()
    # utf-8-sig drops the BOM Windows editors add; older Windows editors save cp1252
    for encoding in CAPTION_ENCODINGS:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        warning = None
        if encoding != CAPTION_ENCODINGS[0]:
            warning = (
                f"caption {caption_path} is not UTF-8; read it as {encoding} "
                f"(check the caption, and save it as UTF-8 to be sure)"
            )
        return _clean_caption(text), warning
    raise AssertionError("latin-1 decodes every byte")  # unreachable: the last encoding never fails


def _clean_caption(text: str) -> str:
    """Return ``text`` with every whitespace run (newlines included) collapsed to one space, stripped."""
    return " ".join(text.split())


def _repeats_for(image_path: Path, root: Path) -> tuple[int, str | None]:
    """Return (repeats, warning about the folder or None) for an image; 0 repeats means left out.

    N comes from the nearest ``N_concept`` folder between ``root`` and the image. kohya's sd-scripts
    only trains folders with N >= 1 and ignores the others, so ``0_concept`` is left out here too. A
    top-level ``abc_concept`` folder (kohya ignores it as well) is trained once per epoch, since its
    images were put there to be trained on; the warning says so.
    """
    parts = image_path.parent.relative_to(root).parts
    for folder in reversed(parts):
        match = _REPEAT_FOLDER.match(folder)
        if match:
            repeats = int(match.group(1))
            return repeats, None
    prefixed = _PREFIXED_FOLDER.match(parts[0]) if parts else None
    if prefixed:
        return 1, (
            f"folder {root / parts[0]}: {prefixed.group(1)!r} is not a repeat count, so its images are used "
            f"once per epoch (kohya would ignore this folder); name it N_{prefixed.group(2)} to repeat them "
            "N times"
        )
    return 1, None


def _left_out_warning(folder: Path, count: int) -> str:
    """The warning for a ``0_concept`` folder whose ``count`` images are not trained on."""
    concept = _REPEAT_FOLDER.match(folder.name)
    rename = f"1_{concept.group(2)}" if concept else "N_concept"
    return (
        f"folder {folder}: a repeat count of 0 leaves its {count} image(s) out of training, as kohya does; "
        f"rename it {rename} to train on them"
    )


def _probe_image(path: Path) -> tuple[int, int]:
    """Return the displayed (width, height) of ``path``; raise _UnreadableImage with a reason if unusable."""
    try:
        if path.stat().st_size == 0:
            raise _UnreadableImage("empty file (0 bytes)")
        with Image.open(path) as image:
            image.verify()
        # verify() leaves the file unusable, and it does not decode pixel data at all for JPEG or WebP, so
        # a truncated JPEG passes it: reopen and decode to catch that.
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS:
                width, height = height, width
            # For JPEG, draft decodes at 1/8 scale: much faster, and truncation is still detected.
            image.draft(image.mode, (1, 1))
            image.load()
    except _UnreadableImage:
        raise
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:  # e.g. a dangling symlink
        raise _UnreadableImage(f"cannot read file ({exc.strerror})") from exc
    except UnidentifiedImageError as exc:
        raise _UnreadableImage("not an image file Pillow can read") from exc
    except Image.DecompressionBombError as exc:
        raise _UnreadableImage(f"image too large ({exc})") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... for bad data
        raise _UnreadableImage(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from exc
    if width < 1 or height < 1:
        raise _UnreadableImage(f"image has no pixels ({width}x{height})")
    return width, height


def _no_images_message(root: Path, skipped: list[tuple[Path, str]], notes: list[str]) -> str:
    """Return the DatasetError message for a folder with no usable image."""
    extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
    message = f"No usable images in dataset folder {root} (looked for {extensions}, in subfolders too)"
    if skipped:
        path, reason = skipped[0]
        message += f"; {len(skipped)} file(s) could not be read, e.g. {path.name}: {reason}"
    if notes:
        message += f"; {notes[0]}"
    return message


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


def process_caption(
    caption: str,
    *,
    trigger_word: str | None,
    shuffle_tags: bool,
    keep_tokens: int,
    caption_dropout: float,
    rng: random.Random,
) -> str:
    """Return the caption to train on for one sample, following kohya's tag semantics.

    - With probability ``caption_dropout`` return "" (trained as the unconditional prompt).
    - Tags are comma-separated, stripped, empty ones dropped, re-joined with ", ".
    - With ``shuffle_tags`` the first ``keep_tokens`` tags of ``caption`` stay in place and the others are
      shuffled. Tags that contain the trigger word (as a whole word, any case) never move.
    - ``trigger_word`` is prepended as the first tag unless the caption already contains it.
    """
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
    if caption_dropout > 0.0 and rng.random() < caption_dropout:
        return ""

    tags = [tag.strip() for tag in caption.split(",")]
    tags = [tag for tag in tags if tag]
    trigger = (trigger_word or "").strip()
    trigger_pattern = re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)", re.IGNORECASE) if trigger else None
    has_trigger = [bool(trigger_pattern and trigger_pattern.search(tag)) for tag in tags]

    if shuffle_tags:
        pinned = {i for i in range(len(tags)) if i < keep_tokens or has_trigger[i]}
        movable = [i for i in range(len(tags)) if i not in pinned]
        shuffled = [tags[i] for i in movable]
        rng.shuffle(shuffled)
        for position, tag in zip(movable, shuffled):
            tags[position] = tag

    if trigger and not any(has_trigger):
        tags.insert(0, trigger)
    return ", ".join(tags)


# --------------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# --------------------------------------------------------------------------------------------------


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Return (width, height) buckets, multiples of ``step``, with area close to but not above resolution².

    For each height the widest width that keeps the area within resolution² is taken (so 1024 gives
    1024x1024, 1088x960, 1152x896, 1216x832, 1344x768, 1408x704 and their transposes), limited to
    long/short side <= ``max_aspect``. The square bucket is always included. Sorted from tallest to widest.
    """
    if step < 1 or resolution < step:
        raise ValueError(f"need resolution >= step >= 1, got resolution={resolution}, step={step}")
    if not 1.0 <= max_aspect <= MAX_ASPECT:  # an unbounded aspect would loop over ~forever widths
        raise ValueError(f"dataset.max_aspect must be between 1 and {MAX_ASPECT:g}, got {max_aspect:g}")

    max_area = resolution * resolution
    side = resolution // step * step
    widest_for_height: dict[int, int] = {}
    for width in range(side, int(resolution * math.sqrt(max_aspect)) + step, step):
        height = max_area // width // step * step
        if height >= step and width / height <= max_aspect:
            # Several widths round to one height; the widest has the area closest to max_area.
            widest_for_height[height] = width
    buckets = {(side, side)} | {(w, h) for h, w in widest_for_height.items()}
    buckets |= {(h, w) for w, h in buckets}
    return sorted(buckets, key=lambda wh: (wh[0] / wh[1], wh[0]))


def assign_bucket(
    width: int, height: int, buckets: list[tuple[int, int]], no_upscale: bool, *, step: int = 64
) -> tuple[int, int]:
    """Return the (width, height) to train an image of this size at.

    Normally the bucket whose aspect ratio is closest (in log space, so 2:1 and 1:2 are equally far from
    1:1); ties go to the larger area. With ``no_upscale``, an image with fewer pixels than that bucket
    gets its own size rounded down to ``step`` instead (at least one step per side), so it is only ever
    cropped, never enlarged, except for sides shorter than one step.
    """
    if not buckets:
        raise ValueError("no buckets to choose from")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    log_aspect = math.log(width / height)
    bucket = min(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - log_aspect), -wh[0] * wh[1]))
    if no_upscale and width * height < bucket[0] * bucket[1]:
        return max(step, width // step * step), max(step, height // step * step)
    return bucket


def assign_buckets(
    items: Iterable[ImageItem], resolution: int, max_aspect: float, no_upscale: bool
) -> list[tuple[int, int]]:
    """The bucket of each item, from the buckets around ``resolution``²."""
    table = make_buckets(resolution, max_aspect=max_aspect)
    return [assign_bucket(item.width, item.height, table, no_upscale) for item in items]


def crop_warnings(
    items: Iterable[ImageItem], buckets: Iterable[tuple[int, int]], max_aspect: float
) -> list[str]:
    """One warning per image whose bucket's crop keeps less than MIN_KEPT_FRACTION of it.

    The image is scaled to cover its bucket, so the crop keeps bucket area / scaled image area.
    """
    warnings = []
    for item, (bucket_w, bucket_h) in zip(items, buckets):
        scale = max(bucket_w / item.width, bucket_h / item.height)
        kept = bucket_w * bucket_h / (item.width * scale * item.height * scale)
        if kept < MIN_KEPT_FRACTION:
            aspect = max(item.width, item.height) / min(item.width, item.height)
            warnings.append(
                f"image {item.path}: {item.width}x{item.height} has aspect {aspect:.1f}:1, beyond "
                f"dataset.max_aspect = {max_aspect:g}; its {bucket_w}x{bucket_h} bucket keeps {kept:.1%} of "
                "the image. Crop it yourself, or raise dataset.max_aspect"
            )
    return warnings


def bucket_summary(assignments: Iterable[tuple[int, int]] | Mapping[object, tuple[int, int]]) -> str:
    """Return a printable table of bucket -> image count (tallest to widest), with a total line.

    ``assignments`` is one (width, height) per image, or a mapping from image to (width, height).
    """
    buckets = assignments.values() if isinstance(assignments, Mapping) else assignments
    counts = Counter((int(w), int(h)) for w, h in buckets)
    lines = [f"{'bucket':>11}  {'aspect':>6}  {'images':>6}"]
    for (width, height), count in sorted(counts.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0][0])):
        lines.append(f"{f'{width}x{height}':>11}  {width / height:>6.2f}  {count:>6}")
    lines.append(f"{'total':>11}  {'':>6}  {sum(counts.values()):>6}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_image(item_path: Path, bucket: tuple[int, int], crop: str, rng: random.Random) -> LoadedImage:
    """Return the image at ``item_path`` resized to cover ``bucket`` (width, height) and cropped to it.

    The image is EXIF-rotated, converted to RGB (transparency composited on white), resized keeping its
    aspect ratio with LANCZOS so it covers the bucket, then cropped at the centre (``crop="center"``) or at
    a position drawn from ``rng`` (``crop="random"``).
    """
    import numpy as np
    import torch

    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    bucket_w, bucket_h = bucket
    with Image.open(item_path) as opened:
        image = _to_rgb(ImageOps.exif_transpose(opened))
    original_w, original_h = image.size

    scale = max(bucket_w / original_w, bucket_h / original_h)
    # max() guards against float rounding leaving the image one pixel short of the bucket.
    resized_w = max(bucket_w, round(original_w * scale))
    resized_h = max(bucket_h, round(original_h * scale))
    if (resized_w, resized_h) != image.size:
        image = image.resize((resized_w, resized_h), Image.Resampling.LANCZOS)

    if crop == "center":
        top, left = (resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2
    else:
        top, left = rng.randint(0, resized_h - bucket_h), rng.randint(0, resized_w - bucket_w)
    image = image.crop((left, top, left + bucket_w, top + bucket_h))

    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0
    return LoadedImage(
        pixels=pixels.contiguous(),
        original_size=(original_h, original_w),
        crop_top_left=(top, left),
        target_size=(bucket_h, bucket_w),
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as RGB; transparent areas become white rather than whatever colour they hide.

    16-bit greyscale (a 16-bit PNG) is scaled to 8 bits; Pillow's own convert clips it at 255 instead.
    """
    if image.mode in _WIDE_GREY_MODES:
        import numpy as np

        wide = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)  # 65535 / 257 = 255
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
