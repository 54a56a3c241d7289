"""Atomic file writes: write a temporary sibling, then rename, so a crash never leaves half a file."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A hidden, unique name next to `path` (same folder, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file, then rename it to `path`; on failure `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        _fsync(tmp)  # so a crash right after the rename cannot leave an empty file under the final name
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_folder(path: Path, write: Callable[[Path], object]) -> Path:
    """Fill a temporary folder with `write(tmp_dir)`, then rename it to `path` (which must not exist)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.mkdir()
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path
