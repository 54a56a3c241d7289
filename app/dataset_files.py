"""Datasets made and edited from the UI: uploaded images (or a zip) put into a new folder under the UI's
datasets folder, and one caption file rewritten in place.

The datasets folder (`datasets/` beside `runs/` and `configs/`) is the only place a new dataset is written.
A zip is read member by member: a name that would land outside the new folder, a link, or an archive whose
content exceeds MAX_DATASET_BYTES is refused, counting the bytes actually read (a zip's sizes can lie).
The new folder is filled under a temporary name and renamed into place, so a failed upload leaves nothing.
"""

from __future__ import annotations

import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from trainers.atomic import atomic_write_text
from trainers.dataset import IMAGE_EXTENSIONS

MAX_DATASET_BYTES = 2 * 1024**3  # what one upload may add to the disk, all files together
MAX_FILES = 20_000
CAPTION_EXTENSIONS = frozenset({".txt", ".caption"})
KEPT_EXTENSIONS = IMAGE_EXTENSIONS | CAPTION_EXTENSIONS
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,63}$")
CHUNK = 1 << 20


class DatasetFileError(ValueError):
    """An upload or caption edit that cannot be done; the message says why and what to do."""


@dataclass
class CreatedDataset:
    folder: Path
    images: int
    captions: int
    ignored: list[str]  # names of uploaded files that are neither images nor captions


def default_datasets_dir(runs_dir: Path) -> Path:
    """datasets/ beside the runs folder."""
    return Path(runs_dir).expanduser().resolve().parent / "datasets"


def new_dataset_folder(datasets_dir: Path, name: str) -> Path:
    """datasets_dir/name for a plain, unused folder name; raises DatasetFileError otherwise."""
    name = (name or "").strip()
    if not DATASET_NAME.match(name) or name in (".", ".."):
        raise DatasetFileError(
            f"dataset name {name!r}: use letters, digits, '.', '_', '-' or spaces (no slashes), "
            "at most 64 characters"
        )
    folder = Path(datasets_dir).resolve() / name
    if folder.exists():
        raise DatasetFileError(f"dataset name {name!r}: {folder} already exists; choose another name")
    return folder


def create_dataset(datasets_dir: Path, name: str, uploads: list[str | Path]) -> CreatedDataset:
    """A new folder datasets_dir/name holding the uploaded images and captions (a zip is unpacked)."""
    folder = new_dataset_folder(datasets_dir, name)
    if not uploads:
        raise DatasetFileError("no files uploaded: drop images (and their .txt captions) or a .zip")
    Path(datasets_dir).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=datasets_dir))
    try:
        budget = _Budget()
        ignored: list[str] = []
        for upload in uploads:
            path = Path(upload)
            if path.suffix.lower() == ".zip":
                ignored += _unpack_zip(path, staging, budget)
            elif path.suffix.lower() in KEPT_EXTENSIONS:
                budget.add_file()
                with path.open("rb") as source:
                    _copy_limited(source, staging / _safe_file_name(path.name), budget)
            else:
                ignored.append(path.name)
        images = sum(1 for p in staging.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise DatasetFileError(
                f"no images among the uploaded files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        captions = sum(1 for p in staging.rglob("*") if p.suffix.lower() in CAPTION_EXTENSIONS)
        staging.rename(folder)  # fails if the name was taken meanwhile: nothing is overwritten
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CreatedDataset(folder=folder, images=images, captions=captions, ignored=ignored)


class _Budget:
    """Bytes and files written so far, against the limits of one upload."""

    def __init__(self) -> None:
        self.bytes = 0
        self.files = 0

    def add_file(self) -> None:
        self.files += 1
        if self.files > MAX_FILES:
            raise DatasetFileError(f"more than {MAX_FILES} files: split the dataset or copy it by hand")

    def add_bytes(self, count: int) -> None:
        self.bytes += count
        if self.bytes > MAX_DATASET_BYTES:
            raise DatasetFileError(
                f"the upload unpacks to more than {MAX_DATASET_BYTES // 1024**3} GiB; "
                "copy a dataset that large into the datasets folder by hand"
            )


def _copy_limited(source, target: Path, budget: _Budget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("xb") as out:  # "x": never overwrite (two members of one name are refused)
        while chunk := source.read(CHUNK):
            budget.add_bytes(len(chunk))
            out.write(chunk)


def _safe_file_name(name: str) -> str:
    plain = Path(name).name
    if plain in ("", ".", ".."):
        raise DatasetFileError(f"uploaded file {name!r} has no usable name")
    return plain


def _unpack_zip(archive: Path, target: Path, budget: _Budget) -> list[str]:
    """Extract the images and captions of `archive` under `target`; returns the names left out."""
    ignored = []
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = zipped.infolist()
            declared = sum(member.file_size for member in members)
            if declared > MAX_DATASET_BYTES:
                budget.add_bytes(declared)  # raises: refused before anything is written
            for member in members:
                if member.is_dir():
                    continue
                relative = _member_path(member)
                if relative.suffix.lower() not in KEPT_EXTENSIONS or _hidden(relative):
                    ignored.append(member.filename)
                    continue
                budget.add_file()
                destination = target.joinpath(*relative.parts)
                with zipped.open(member) as source:
                    _copy_limited(source, destination, budget)
    except zipfile.BadZipFile as error:
        raise DatasetFileError(f"{archive.name} is not a readable zip file ({error})") from None
    except FileExistsError as error:
        raise DatasetFileError(f"{archive.name} holds {Path(error.filename).name} twice") from None
    return ignored


def _member_path(member: zipfile.ZipInfo) -> PurePosixPath:
    """The member's relative path; refuses absolute paths, `..`, drive letters and symbolic links."""
    name = member.filename.replace("\\", "/")
    path = PurePosixPath(name)
    mode = member.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise DatasetFileError(f"zip member {name!r} is a symbolic link; links are not unpacked")
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise DatasetFileError(f"zip member {name!r} points outside the dataset folder; the zip is refused")
    return path


def _hidden(path: PurePosixPath) -> bool:
    """macOS resource forks and dot files (e.g. __MACOSX/._a.png) are not images."""
    return any(part.startswith(".") or part == "__MACOSX" for part in path.parts)


# ---------------------------------------------------------------- captions
def caption_path(image: Path, caption_extension: str) -> Path:
    """The caption file of an image: same folder, same stem, the caption extension."""
    extension = caption_extension or ".txt"
    if not re.fullmatch(r"\.[A-Za-z0-9_]{1,16}", extension):
        raise DatasetFileError(f"dataset.caption_extension {extension!r}: use a suffix such as .txt")
    return Path(image).with_suffix(extension)


def read_caption(image: Path, caption_extension: str) -> str:
    """The caption file's text ("" when there is none)."""
    path = caption_path(image, caption_extension)
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


def write_caption(image: Path, shown_images: list[Path], caption_extension: str, text: str) -> Path:
    """Rewrite the caption of one of the images the Dataset page listed (atomically); returns its path.

    Only an image the page itself listed can be captioned, so nothing else can be written through this.
    """
    image = Path(image)
    if image not in [Path(p) for p in shown_images]:
        raise DatasetFileError("choose an image in the gallery first (scan the dataset again if it changed)")
    path = caption_path(image, caption_extension)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise DatasetFileError(f"{path} is not a plain file; edit it by hand")
    atomic_write_text(path, text.strip() + "\n")
    return path
