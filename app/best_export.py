"""Export the checkpoint with the lowest validation loss, as `python -m trainers export RUN --best` does
(trainers.export_run.best_checkpoint chooses it and words the refusal when that step was not kept)."""

from __future__ import annotations

from pathlib import Path

from app.export_view import ExportedFile, export_lora
from app.validation_view import best_validation
from trainers.checkpoint import list_checkpoints
from trainers.events import read_events


def best_summary(run_dir: Path | None) -> str:
    """What Export best would write, in one line of Markdown ("" without a run)."""
    if run_dir is None:
        return ""
    best = best_validation(read_events(run_dir))
    if best is None:
        return "No validation results in this run, so there is no best step (set `dataset.validation`)."
    kept = {step for step, _ in list_checkpoints(run_dir)}
    where = "its checkpoint is kept" if best.step in kept else "**no checkpoint of that step was kept**"
    return f"Best validation loss {best.loss:.5g} at step {best.step}: {where}."


def export_best(run_dir: Path, formats: list[str]) -> list[ExportedFile]:
    """Export the best-validation checkpoint in `formats`. ValueError (the CLI's words: what to set so the
    best step is kept next time) when the run has no validation or that checkpoint is gone."""
    from trainers.export_run import best_checkpoint  # imports torch and peft: only when exporting

    folder = Path(best_checkpoint(run_dir))
    step = next((step for step, path in list_checkpoints(run_dir) if Path(path) == folder), None)
    if step is None:
        raise ValueError(f"{folder} is not one of {Path(run_dir).name}'s checkpoints")
    return export_lora(run_dir, step, formats)
