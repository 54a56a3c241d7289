"""The Export tab's logic: a run's checkpoints, exporting one in-process, and the files' metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainers.checkpoint import checkpoint_dir, list_checkpoints

FORMATS = ("kohya", "diffusers")


@dataclass(frozen=True)
class ExportedFile:
    """A written LoRA file with its size and safetensors header metadata."""

    path: Path
    size_bytes: int
    metadata: dict[str, str]


def checkpoint_choices(run_dir: Path | None) -> list[tuple[str, int]]:
    """(label, step) of each checkpoint of the run, newest first; [] for no run."""
    if run_dir is None:
        return []
    return [(f"step {step}", step) for step, _ in reversed(list_checkpoints(run_dir))]


def export_lora(run_dir: Path, step: int | None, formats: list[str]) -> list[ExportedFile]:
    """Export checkpoint `step` (None: the newest) of the run in `formats`; returns the written files.

    Raises ValueError / FileNotFoundError with a message when the run, checkpoint or formats are wrong.
    """
    from trainers.export import read_lora_metadata
    from trainers.export_run import export_checkpoint  # imports torch and peft: only when exporting

    run_dir = Path(run_dir)
    if not formats:
        raise ValueError(
            "choose at least one format (kohya for ComfyUI/A1111/Forge, diffusers for diffusers)"
        )
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown format {unknown[0]!r}; use kohya or diffusers")
    folder = checkpoint_dir(run_dir, int(step)) if step is not None else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"{run_dir.name} has no checkpoint at step {step}")
    written = export_checkpoint(run_dir, folder, list(formats))
    return [ExportedFile(Path(p), Path(p).stat().st_size, read_lora_metadata(p)) for p in written]


def exported_markdown(files: list[ExportedFile]) -> str:
    """Where the files went, one line each, as Markdown."""
    if not files:
        return "Nothing was written."
    lines = ["**Written:**"]
    lines += [
        f"- `{f.path}` ({f.size_bytes / 1024:.1f} KiB, {len(f.metadata)} metadata entries)" for f in files
    ]
    return "\n".join(lines)


def metadata_by_file(files: list[ExportedFile]) -> dict[str, dict[str, str]]:
    """File name -> header metadata, for a JSON view."""
    return {f.path.name: f.metadata for f in files}
