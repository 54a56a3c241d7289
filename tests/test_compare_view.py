"""Run comparison (app/compare_view.py) and the validation views (app/validation_view.py) on synthetic
events.jsonl and config.toml files whose expected tables are written out by hand."""

from __future__ import annotations

import math

import pytest
from run_helpers import write_run_folder

from app import compare_view as compare
from app import validation_view as validation

CONFIG_A = """name = "a"
output_dir = "runs"
[model]
family = "sdxl"
[lora]
rank = 8
alpha = 8
[optimizer]
d_coef = 1.0
d0 = 1e-4
split_groups = true
[dataset]
trigger_words = ["shapes"]
"""
CONFIG_B = CONFIG_A.replace('name = "a"', 'name = "b"').replace("rank = 8", "rank = 16")
CONFIG_B = CONFIG_B.replace("d_coef = 1.0", "d_coef = 0.5").replace(
    "split_groups = true", "split_groups = false"
)
CONFIG_B = CONFIG_B.replace('["shapes"]', '["shapes", "dots"]')


def _step(step: int, loss: float, ds: dict[str, float]) -> dict:
    groups = [{"name": name, "d": d, "lr": d} for name, d in ds.items()]
    return {"type": "step", "step": step, "loss": loss, "groups": groups, "time": 100.0 + step}


@pytest.fixture
def two_runs(tmp_path):
    """Run a: 4 steps, d doubling from 1e-4, two groups, validation at 2 and 4 (best at 2).
    Run b: 3 steps, one group, no validation, no done event."""
    a_events = [{"type": "start", "total_steps": 4, "step": 0}]
    for step in range(1, 5):
        a_events.append(_step(step, 1.0 / step, {"unet": 1e-4 * 2**step, "text_encoder": 1e-5}))
        if step % 2 == 0:
            a_events.append({"type": "validation", "step": step, "loss": 0.5 if step == 2 else 0.6})
    a_events.append({"type": "done", "step": 4, "final_d": [1.6e-3, 1e-5]})
    b_events = [{"type": "start", "total_steps": 10, "step": 0}]
    b_events += [_step(step, 2.0, {"unet": 10.0**-step}) for step in range(1, 4)]
    a = write_run_folder(tmp_path / "a", a_events, CONFIG_A)
    b = write_run_folder(tmp_path / "b", b_events, CONFIG_B)
    return compare.load_runs([a, b])


def test_loss_overlay_is_each_runs_debiased_ema_by_step(two_runs):
    frame = compare.loss_overlay(two_runs)
    a = frame[frame["run"] == "a"]
    # debiased EMA 0.9 of 1, 1/2, 1/3, 1/4 written out: sum(0.1*0.9^(n-k) x_k) / (1 - 0.9^n)
    xs = [1.0, 1 / 2, 1 / 3, 1 / 4]
    expected = [
        sum(0.1 * 0.9 ** (n - k) * xs[k - 1] for k in range(1, n + 1)) / (1 - 0.9**n) for n in range(1, 5)
    ]
    assert list(a["step"]) == [1, 2, 3, 4]
    assert list(a["training loss"]) == pytest.approx(expected)
    b = frame[frame["run"] == "b"]
    assert list(b["step"]) == [1, 2, 3] and list(b["training loss"]) == pytest.approx([2.0, 2.0, 2.0])
    assert str(frame["step"].dtype) == "int64" and str(frame["training loss"].dtype) == "float64"


def test_d_overlay_is_log10_d_per_run_and_group(two_runs):
    frame = compare.d_overlay(two_runs)
    assert set(frame["series"]) == {"a · unet", "a · text_encoder", "b · unet"}
    a_unet = frame[frame["series"] == "a · unet"]
    assert list(a_unet["step"]) == [1, 2, 3, 4]
    assert list(a_unet["log10 d"]) == pytest.approx([-4 + s * math.log10(2) for s in range(1, 5)])
    b_unet = frame[frame["series"] == "b · unet"]
    assert list(b_unet["log10 d"]) == pytest.approx([-1.0, -2.0, -3.0])


def test_validation_overlay_only_for_runs_that_validated(two_runs):
    frame = compare.validation_overlay(two_runs)
    assert frame.values.tolist() == [[2, 0.5, "a"], [4, 0.6, "a"]]


def test_summary_has_final_d_and_best_validation(two_runs):
    table = compare.summary_table(two_runs).set_index("run")
    assert table.loc["a", "final d"] == "unet 0.0016, text_encoder 1e-05"  # from the done event
    assert table.loc["a", "best validation loss"] == "0.5" and table.loc["a", "at step"] == "2"
    assert table.loc["a", "steps"] == "4/4"
    assert table.loc["b", "final d"] == "unet 0.001"  # no done event: the newest step's d
    assert table.loc["b", "best validation loss"] == compare.MISSING
    assert table.loc["b", "steps"] == "3/10"


def test_config_differences_lists_exactly_the_values_that_differ(two_runs):
    table = compare.config_differences(two_runs)
    assert table.columns.tolist() == ["setting", "a", "b"]
    assert table.values.tolist() == [
        ["dataset.trigger_words", "shapes", "shapes, dots"],
        ["lora.rank", "8", "16"],
        ["optimizer.d_coef", "1", "0.5"],
        ["optimizer.split_groups", "true", "false"],
    ]
    assert "differ" in compare.differences_caption(two_runs, table)


def test_a_setting_only_one_run_has_is_shown_as_missing_in_the_other(tmp_path):
    a = write_run_folder(tmp_path / "a", [], CONFIG_A)
    b = write_run_folder(tmp_path / "b", [], CONFIG_A + "[validation]\nevery_n_steps = 5\n")
    c = write_run_folder(tmp_path / "c", [], None)
    runs = compare.load_runs([a, b, c])
    table = compare.config_differences(runs)
    rows = {row[0]: row[1:] for row in table.values.tolist()}
    assert rows["validation.every_n_steps"] == [compare.MISSING, "5", compare.MISSING]
    assert rows["lora.rank"] == ["8", "8", compare.MISSING]  # c has no config at all
    assert "name" not in rows


def test_same_configs_and_empty_runs(tmp_path):
    a = write_run_folder(tmp_path / "a", [], CONFIG_A)
    b = write_run_folder(tmp_path / "b", [], CONFIG_A.replace('name = "a"', 'name = "b"'))
    runs = compare.load_runs([a, b])
    table = compare.config_differences(runs)
    assert len(table) == 0 and "same" in compare.differences_caption(runs, table)
    assert compare.loss_overlay(runs) is None and compare.d_overlay(runs) is None
    assert compare.validation_overlay(runs) is None


def test_fewer_than_two_runs_is_refused(tmp_path):
    a = write_run_folder(tmp_path / "a", [], CONFIG_A)
    with pytest.raises(compare.CompareError, match="two or more"):
        compare.load_runs([a, a])


def test_long_runs_are_drawn_with_bounded_points_and_keep_a_spike(tmp_path):
    events = [_step(step, 1.0, {"unet": 1e-3}) for step in range(1, 20_001)]
    events[12_345]["groups"][0]["d"] = 1.0  # a spike in d at step 12346
    a = write_run_folder(tmp_path / "a", events, CONFIG_A)
    b = write_run_folder(tmp_path / "b", events[:10], CONFIG_A)
    runs = compare.load_runs([a, b])
    frame = compare.d_overlay(runs)
    a_d = frame[frame["series"] == "a · unet"]
    assert len(a_d) <= 1000
    assert (12_346, 0.0) in list(zip(a_d["step"], a_d["log10 d"]))
    assert a_d["step"].iloc[-1] == 20_000


# ---------------------------------------------------------------- validation_view
def test_validation_points_count_a_repeated_step_once_and_skip_broken_losses():
    events = [
        {"type": "validation", "step": 4, "loss": 0.7},
        {"type": "validation", "step": 8, "loss": 0.4},
        {"type": "validation", "step": 8, "loss": 0.45},  # re-evaluated after a resume: the newest counts
        {"type": "validation", "step": 12, "loss": "nan"},
        {"type": "validation", "step": 16, "loss": 0.45},
    ]
    assert validation.validation_points(events) == [(4, 0.7), (8, 0.45), (16, 0.45)]
    best = validation.best_validation(events)
    assert (best.step, best.loss) == (8, 0.45)  # a tie goes to the earlier step
    assert validation.best_validation([]) is None


def test_validation_frame_names_both_losses_and_marks_the_best_step():
    events = [
        {"type": "validation", "step": 2, "loss": 0.3},
        {"type": "validation", "step": 4, "loss": 0.2},
        {"type": "validation", "step": 6, "loss": 0.25},
    ]
    training = [(1, 0.5), (2, 0.4), (3, 0.35)]
    frame = validation.validation_frame(events, training)
    by_series = {name: list(zip(group["step"], group["loss"])) for name, group in frame.groupby("series")}
    assert by_series["training loss at y"] == training
    assert by_series["validation loss at x"] == [(2, 0.3), (4, 0.2), (6, 0.25)]
    assert (
        "y (the training point)" in validation.PLOT_TITLE
        and "x (the exported weights)" in validation.PLOT_TITLE
    )
    assert by_series["best validation: step 4"] == [(4, 0.2), (4, 0.5)]  # spans the plotted values
    assert validation.validation_frame([], training) is None
    assert "step **4**" in validation.validation_caption(events)
    assert "dataset.validation" in validation.validation_caption([])


def test_training_points_are_the_smoothed_series_of_a_loss_table():
    from app.events_view import loss_frame

    events = [_step(s, float(s), {"unet": 1e-4}) for s in (1, 2, 3)]
    points = validation.training_points(loss_frame(events))
    # debiased EMA of 1, 2, 3
    assert [x for x, _ in points] == [1, 2, 3]
    expected = [1.0, (0.09 * 1 + 0.1 * 2) / 0.19, (0.081 * 1 + 0.09 * 2 + 0.1 * 3) / 0.271]
    assert [y for _, y in points] == pytest.approx(expected)
    assert validation.training_points(None) == []
