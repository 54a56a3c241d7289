"""Messages of `python -m trainers` that help (issue 10, item 5): every problem in one report, the origin
named, did-you-mean across sections, relative paths shown with the folder they are read from, and the
optimizer's eval-mode error in the public release's words. No model is loaded here."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w
import torch

from ppsf_optim import ProdigyPlusScheduleFree
from trainers.__main__ import main as cli
from trainers.checks import load_checked, path_problems
from trainers.config import ConfigError, describe_errors, load_config


def _config(tmp_path: Path, **sections) -> Path:
    data = {
        "name": "run",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": "demo://tiny-sdxl"},
        "dataset": {"path": "demo://shapes", "resolution": 64},
        "training": {"max_steps": 2},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values) if isinstance(values, dict) else data.update(
            {section: values}
        )
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def _problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_checked(path, overrides)
    return caught.value.problems


def test_a_set_typo_is_blamed_on_the_set_not_on_the_file(tmp_path) -> None:
    path = _config(tmp_path)
    problems = _problems(path, ["training.max_step=50"])
    assert problems == [
        "--set training.max_step=50: training.max_step: unknown key; did you mean 'max_steps'?"
    ]
    assert str(path) not in problems[0]


def test_a_typo_in_the_file_is_blamed_on_the_file(tmp_path) -> None:
    path = _config(tmp_path, training={"max_step": 50})
    problems = _problems(path, ["training.max_steps=50"])
    assert problems == [f"{path}: training.max_step: unknown key; did you mean 'max_steps'?"]


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("max_steps=50", "did you mean 'training.max_steps'?"),  # the right key in the wrong section
        ("dataset.rank=4", "did you mean 'lora.rank'?"),
        ("max_step=50", "did you mean 'training.max_steps'?"),  # a typo and a wrong section at once
    ],
)
def test_did_you_mean_looks_across_sections(tmp_path, override, suggestion) -> None:
    problems = _problems(_config(tmp_path), [override])
    assert len(problems) == 1 and problems[0].startswith(f"--set {override}: ") and suggestion in problems[0]


def test_a_typo_does_not_hide_a_wrong_path(tmp_path) -> None:
    path = _config(tmp_path, training={"max_stepz": 50}, dataset={"path": str(tmp_path / "no-images")})
    problems = _problems(path)
    assert problems[0].startswith(f"{path}: training.max_stepz: unknown key")
    assert f"dataset.path: {tmp_path / 'no-images'} does not exist" in problems


def test_check_prints_schema_and_path_problems_in_one_report(tmp_path, capsys) -> None:
    path = _config(tmp_path, model={"path": str(tmp_path / "missing.safetensors")})
    assert cli(["check", str(path), "--set", "max_steps=3", "--set", f"dataset.path={tmp_path}/nothing"]) == 2
    err = capsys.readouterr().err
    assert "--set max_steps=3: max_steps: unknown key; did you mean 'training.max_steps'?" in err
    assert f"model.path: {tmp_path / 'missing.safetensors'} does not exist" in err
    assert f"dataset.path: {tmp_path / 'nothing'} does not exist" in err


def test_a_relative_path_says_what_it_is_relative_to(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _config(tmp_path, dataset={"path": "datasets/me"})
    assert path_problems(load_config(path)) == [
        f"dataset.path: datasets/me (relative to the current folder {tmp_path}: {tmp_path / 'datasets/me'}) "
        "does not exist"
    ]


def test_describe_errors_keeps_its_one_line_per_problem_form() -> None:
    """The UI's Setup page shows these lines next to each section."""
    from pydantic import ValidationError

    from trainers.config import TrainConfig

    with pytest.raises(ValidationError) as caught:
        TrainConfig.model_validate(
            {"name": "x", "model": {"path": "p"}, "dataset": {"path": "d"}, "max_steps": 1}
        )
    assert describe_errors(caught.value, TrainConfig) == [
        "training: required, but missing",
        "max_steps: unknown key; did you mean 'training.max_steps'?",
    ]


def test_the_optimizer_in_eval_mode_refuses_step_in_the_public_release_words() -> None:
    """prodigy-plus-schedule-free raises "Not in train mode!"; code that matches on it keeps working."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = ProdigyPlusScheduleFree([param])
    param.grad = torch.ones(3)
    optimizer.eval()
    with pytest.raises(RuntimeError, match="Not in train mode!"):
        optimizer.step()
    assert torch.equal(param.detach(), torch.ones(3))  # and nothing changed
