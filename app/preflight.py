"""Checks run before a config is started (and by the Setup tab's Check button), without loading a model."""

from __future__ import annotations

from pathlib import Path

from app.path_checks import config_path_problems
from app.runner import holds_run
from trainers.config import TrainConfig


def preflight(config: TrainConfig, runs_dir: Path) -> tuple[list[str], str]:
    """(problems, dataset summary) of a validated config: the trainer's own check plus what the UI needs.

    Problems are "section.field: message" lines; none means the run can start.
    """
    from trainers.checks import check_config  # imports torch: only when checking

    problems = []
    if Path(config.output_dir).expanduser().resolve() != Path(runs_dir).resolve():
        problems.append(
            f"output_dir: this UI keeps its runs in {Path(runs_dir).resolve()}; "
            "start the UI with --runs-dir to use another folder"
        )
    problems += config_path_problems(config)
    trainer_problems, summary = check_config(config)
    problems += trainer_problems
    if holds_run(config.run_dir):
        problems.append(
            f"name: run folder {config.run_dir} already holds a run; resume it on the Run tab or choose another name"
        )
    return problems, summary
