"""Atomic file writes: write a temporary sibling, then rename, so a crash never leaves half a file."""

from __future__ import annotations

import os
import re
import shutil
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

# what temporary_sibling makes: ".NAME.tmp-PID-xxxxxxxx"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


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
        fault_point(f"rename:{path.name}")
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


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, but written by Python: a full disk is then an OSError with its errno
    (safetensors' own writer reports it as a SafetensorError)."""
    from safetensors.torch import save  # torch is not loaded for the other helpers here

    Path(path).write_bytes(save(tensors, metadata))


def stale_temporaries(folder: Path) -> list[tuple[Path, str]]:
    """(path, final name) of each temporary_sibling in `folder` left by a writer that is gone.

    A writer is gone when its process no longer exists, or when it had our own process id (ids are
    reused, and this process has not written anything there yet when it asks).
    """
    found = []
    if Path(folder).is_dir():
        for child in sorted(Path(folder).iterdir()):
            match = _TEMPORARY.match(child.name)
            if match and not _other_process_alive(int(match.group("pid"))):
                found.append((child, match.group("name")))
    return found


def _other_process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_path(path: Path) -> None:
    """Delete a file or a folder tree (missing is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test hook, inert unless PPSF_FAULT is set: PPSF_FAULT=NAME:N makes this process SIGKILL itself
    the Nth time it passes the point NAME (N defaults to 1). tests/test_durability.py uses it to kill
    a real trainer inside a write's critical window."""
    spec = os.environ.get("PPSF_FAULT")
    if not spec:
        return
    target, _, count = spec.rpartition(":")
    if not count.isdigit():
        target, count = spec, "1"
    if target != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
