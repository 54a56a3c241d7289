"""Checks of file and folder paths typed into the UI: they exist, can be read, and are the right kind.

Paths are only ever opened or passed as one argument in a subprocess argument list, never run by a shell;
these checks turn a wrong path into a message before anything uses it.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainers.config import DEMO_SCHEME, TrainConfig


def expand(path: str | Path) -> Path:
    """The path with ~ expanded (typed paths are relative to the UI's working folder)."""
    return Path(str(path).strip()).expanduser()


def folder_problem(path: str | Path, what: str = "folder") -> str | None:
    """Why `path` is not a readable folder, or None if it is one."""
    if not str(path).strip():
        return f"{what}: no path given"
    folder = expand(path)
    if not folder.exists():
        return f"{what}: {folder} does not exist"
    if not folder.is_dir():
        return f"{what}: {folder} is a file, not a folder"
    if not os.access(folder, os.R_OK | os.X_OK):
        return f"{what}: {folder} cannot be read (permissions)"
    return None


def file_problem(path: str | Path, what: str = "file", suffixes: tuple[str, ...] = ()) -> str | None:
    """Why `path` is not a readable file (with one of `suffixes`, if given), or None if it is one."""
    if not str(path).strip():
        return f"{what}: no path given"
    file = expand(path)
    if not file.exists():
        return f"{what}: {file} does not exist"
    if file.is_dir():
        return f"{what}: {file} is a folder, not a file"
    if suffixes and file.suffix.lower() not in suffixes:
        return f"{what}: {file} is not a {' or '.join(suffixes)} file"
    if not os.access(file, os.R_OK):
        return f"{what}: {file} cannot be read (permissions)"
    return None


def writable_file_problem(path: str | Path, what: str = "file", suffixes: tuple[str, ...] = ()) -> str | None:
    """Why a file cannot be written at `path` (missing or read-only folder, a folder in the way), or None."""
    if not str(path).strip():
        return f"{what}: no path given"
    file = expand(path)
    if suffixes and file.suffix.lower() not in suffixes:
        return f"{what}: {file} must end in {' or '.join(suffixes)}"
    if file.is_dir():
        return f"{what}: {file} is a folder"
    parent = file.parent
    if not parent.is_dir():
        return f"{what}: folder {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK) or (file.exists() and not os.access(file, os.W_OK)):
        return f"{what}: {file} cannot be written (permissions)"
    return None


def confined_file(
    typed: str | Path, base: Path, allowed: list[Path], what: str, suffixes: tuple[str, ...] = ()
) -> tuple[Path | None, str | None]:
    """(file, None) if `typed` names a file inside one of the `allowed` folders, else (None, problem).

    A relative path is taken from `base`. The check is on the resolved path (symlinks and `..` followed),
    so neither leads out; the problem never says whether something outside exists, so nothing can be probed.
    """
    text = str(typed or "").strip()
    if not text:
        return None, f"{what}: no file name given"
    name = Path(text).expanduser()
    if suffixes and name.suffix.lower() not in suffixes:
        return None, f"{what}: {text} must end in {' or '.join(suffixes)}"
    resolved = (Path(base) / name).resolve()  # an absolute `name` replaces `base`
    folders = [Path(folder).resolve() for folder in allowed]
    if not any(resolved.is_relative_to(folder) and resolved != folder for folder in folders):
        where = " or ".join(str(folder) for folder in folders)
        return None, f"{what}: {text} is outside {where}; this UI only uses files in there (type a file name)"
    return resolved, None


def config_path_problems(config: TrainConfig) -> list[str]:
    """Readability problems of the config's local model and dataset paths (demo:// paths are fine).

    trainers.paths.path_problems already says missing or wrong-kind; this adds what it does not check.
    """
    problems = []
    dataset = config.dataset.path
    if not dataset.startswith(DEMO_SCHEME) and expand(dataset).is_dir():
        problem = folder_problem(dataset, "dataset.path")
        if problem:
            problems.append(problem)
    model = config.model.path
    if not model.startswith(DEMO_SCHEME) and expand(model).exists():
        local = expand(model)
        problem = folder_problem(local, "model.path") if local.is_dir() else file_problem(local, "model.path")
        if problem:
            problems.append(problem)
    return problems
