"""Long runs on the Run page: events.jsonl read incrementally (EventTail), plots bounded by min/max buckets
(MinMaxSeries), running summaries (RunHistory) and the Run tab's refresh on a 100k-step run.

References are independent: read_events on the whole file, numpy over each bucket's slice, and the
whole-list views (loss_frame, d_frame, lr_frame, progress) the Run tab used before.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app import events_view as view
from app.events_view import KEEP_LAST, MAX_POINTS, MinMaxSeries, RunHistory
from app.run_view import snapshot, watch
from trainers.events import EVENTS_FILE, EventTail, read_events


def _line(event: dict) -> str:
    return json.dumps(event) + "\n"


def _step(step: int, loss: float, d: float = 1e-4, time: float | None = None) -> dict:
    groups = [{"name": "unet", "d": d, "lr": d}, {"name": "text_encoder", "d": d / 2, "lr": d / 4}]
    return {"type": "step", "step": step, "loss": loss, "groups": groups, "time": time or 1000.0 + step}


def _run_events(steps: int, freeze_at: int | None = None, seed: int = 0) -> list[dict]:
    """A run's events: dataset, start, steps with a noisy loss and a growing d, samples, checkpoints."""
    rng = random.Random(seed)
    events = [
        {"type": "dataset", "images": 12, "missing_captions": 0, "skipped": []},
        {"type": "start", "step": 0, "total_steps": steps},
    ]
    d = 1e-6
    for step in range(1, steps + 1):
        if freeze_at is None or step <= freeze_at:
            d = min(1e-2, d * 1.01)
        events.append(_step(step, 0.2 + rng.random() * 0.05, d))
        if step == freeze_at:
            events.append({"type": "freeze", "step": step, "since_step": step, "d": [d, d / 2]})
        if step % 500 == 0:
            events.append({"type": "sample", "step": step, "paths": [], "prompts": []})
            events.append(
                {"type": "checkpoint", "step": step, "path": f"/runs/x/checkpoints/step-{step:06d}"}
            )
    return events


def _write(path: Path, events: list[dict]) -> None:
    path.write_text("".join(_line(e) for e in events), encoding="utf-8")


def _append(path: Path, text: str | bytes) -> None:
    with path.open("ab") as file:
        file.write(text.encode() if isinstance(text, str) else text)


# ---------------------------------------------------------------- EventTail
def test_tail_reads_only_what_was_appended(tmp_path):
    path = tmp_path / EVENTS_FILE
    tail = EventTail(tmp_path)
    assert tail.read() == ([], False)  # no file yet
    _write(path, [{"type": "start"}, _step(1, 0.5)])
    events, restarted = tail.read()
    assert [e["type"] for e in events] == ["start", "step"] and not restarted
    assert tail.read() == ([], False)
    _append(path, _line(_step(2, 0.4)) + _line(_step(3, 0.3)))
    events, restarted = tail.read()
    assert [e["step"] for e in events] == [2, 3] and not restarted
    assert tail.offset == path.stat().st_size


def test_tail_leaves_a_partial_line_for_the_next_read(tmp_path):
    path = tmp_path / EVENTS_FILE
    _write(path, [_step(1, 0.5)])
    whole = _line(_step(2, 0.4))
    _append(path, whole[:17])  # the trainer is in the middle of writing step 2
    tail = EventTail(tmp_path)
    assert [e["step"] for e in tail.read()[0]] == [1]
    _append(path, whole[17:])
    assert [e["step"] for e in tail.read()[0]] == [2]


def test_tail_skips_a_broken_line_as_read_events_does(tmp_path):
    path = tmp_path / EVENTS_FILE
    # a line cut short by a kill, then the next event on a line of its own; and bytes that are not UTF-8
    _append(path, _line(_step(1, 0.5)) + '{"type": "st\n' + _line(_step(2, 0.4)))
    _append(path, b'{"type": "\xff\xfe"}\n' + _line(_step(3, 0.3)).encode())
    events, _ = EventTail(tmp_path).read()
    assert [e["step"] for e in events] == [1, 2, 3]
    path.write_text(path.read_bytes().replace(b"\xff\xfe", b"ok").decode(), encoding="utf-8")
    assert EventTail(tmp_path).read()[0] == read_events(tmp_path)


def test_tail_starts_over_when_the_file_shrinks_or_is_replaced(tmp_path):
    path = tmp_path / EVENTS_FILE
    events = _run_events(300)
    _write(path, events)
    tail = EventTail(tmp_path)
    assert len(tail.read()[0]) == len(events)
    # resume rewrites it in place, dropping events after the checkpoint: shorter than what was read
    kept = [e for e in events if e.get("step", 0) <= 100]
    _write(path, kept)
    read, restarted = tail.read()
    assert restarted and read == kept
    # ...or atomically (temp file and rename): another file, here longer than what was read
    resumed = [*kept, {"type": "resumed", "step": 100}, *[_step(s, 0.1) for s in range(101, 400)]]
    temp = tmp_path / "events.jsonl.tmp"
    _write(temp, resumed)
    os.replace(temp, path)
    read, restarted = tail.read()
    assert restarted and read == resumed
    # ...or in place, to the same size, with another last event: the bytes before the offset changed
    text = path.read_text(encoding="utf-8")
    assert text.endswith('"time": 1399.0}\n')
    path.write_text(text[: -len("1399.0}\n")] + "1400.0}\n", encoding="utf-8")
    read, restarted = tail.read()
    assert restarted and read == read_events(tmp_path)
    path.unlink()
    assert tail.read() == ([], True)


def test_tail_read_piece_by_piece_equals_read_events(tmp_path):
    path = tmp_path / EVENTS_FILE
    text = "".join(_line(e) for e in _run_events(1200, freeze_at=700))
    data = text.encode()
    tail = EventTail(tmp_path)
    tail.CHUNK_BYTES = 4096  # several chunks per read, lines split across chunks
    rng = random.Random(1)
    collected, position = [], 0
    while position < len(data):
        cut = min(len(data), position + rng.randint(1, 30_000))  # anywhere, mid-line included
        _append(path, data[position:cut])
        position = cut
        events, restarted = tail.read()
        assert not restarted
        collected += events
    assert collected == read_events(tmp_path)


# ---------------------------------------------------------------- MinMaxSeries
def _bucket_slices(series: MinMaxSeries) -> list[tuple[int, int]]:
    """[start, end) index of each closed bucket and the open one in the added points."""
    slices, start = [], 0
    for bucket in [*series.buckets, series.open]:
        slices.append((start, start + bucket.count))
        start += bucket.count
    return slices


def test_decimation_keeps_each_buckets_min_and_max_and_the_last_points():
    rng = np.random.default_rng(0)
    steps = np.arange(1, 100_001)
    values = rng.normal(1.0, 0.1, steps.size)
    spikes = rng.choice(steps.size, 20, replace=False)
    values[spikes[:10]] = 50.0 + np.arange(10)  # isolated spikes up...
    values[spikes[10:]] = -50.0 - np.arange(10)  # ...and down
    series = MinMaxSeries()
    for step, value in zip(steps.tolist(), values.tolist()):
        series.add(step, value)
    points = series.points()
    assert len(points) <= MAX_POINTS and len(series) == steps.size
    assert [x for x, _ in points] == sorted({x for x, _ in points})  # step order, no step twice
    exact = dict(zip(steps.tolist(), values.tolist()))
    assert all(exact[x] == y for x, y in points)  # only real points, never averages
    drawn = set(points)
    for start, end in _bucket_slices(series):  # numpy over each bucket's slice as the reference
        if start == end:
            continue
        low, high = int(np.argmin(values[start:end])) + start, int(np.argmax(values[start:end])) + start
        assert (int(steps[low]), values[low]) in drawn and (int(steps[high]), values[high]) in drawn
    for index in spikes:
        assert (int(steps[index]), values[index]) in drawn
    recent = list(zip(steps[-KEEP_LAST:].tolist(), values[-KEEP_LAST:].tolist()))
    assert points[-KEEP_LAST:] == recent


def test_decimation_is_the_plain_series_while_it_fits():
    for length in (0, 1, 199, 200, 201, 500, 950):
        series = MinMaxSeries()
        plain = [(step, math.sin(step) + step * 1e-3) for step in range(1, length + 1)]
        for point in plain:
            series.add(*point)
        assert series.points() == plain, length


def test_decimation_stays_bounded_for_any_length_and_keeps_pinned_points():
    series = MinMaxSeries(max_points=100, keep_last=20)
    plain = []
    for step in range(1, 20_001):
        value = math.sin(step / 50)
        plain.append((step, value))
        series.add(step, value)
        if step == 7_321:
            series.pin(step)  # the freeze: pinned while still among the recent points
        if step % 997 == 0:
            assert len(series.points()) <= 100
    points = series.points()
    assert (7_321, plain[7_320][1]) in points
    assert points[-20:] == plain[-20:]
    assert max(y for _, y in points) == max(y for _, y in plain)
    assert min(y for _, y in points) == min(y for _, y in plain)


# ---------------------------------------------------------------- RunHistory against the whole-list views
def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["series", "step", frame.columns[1]]).reset_index(drop=True)


@pytest.mark.parametrize("freeze_at", [None, 150])
def test_history_of_a_short_run_equals_the_whole_list_views(freeze_at):
    events = _run_events(600, freeze_at=freeze_at)
    events.insert(300, {"type": "warning", "message": "latents are not cached"})
    incremental = RunHistory()
    for start in range(0, len(events), 37):  # in batches, as refreshes read them
        assert incremental.add(events[start : start + 37])
    for history in (incremental, RunHistory.from_events(events)):
        pd.testing.assert_frame_equal(_sorted(history.loss_frame()), _sorted(view.loss_frame(events)))
        pd.testing.assert_frame_equal(_sorted(history.d_frame()), _sorted(view.d_frame(events)))
        pd.testing.assert_frame_equal(_sorted(history.lr_frame()), _sorted(view.lr_frame(events)))
        kept = history.events
        assert view.progress(kept) == view.progress(events)
        assert view.notices_markdown(kept, "running") == view.notices_markdown(events, "running")
        assert view.run_summary(kept, "running") == view.run_summary(events, "running")
        assert len(kept) < len(events) / 2


def test_history_smoothing_equals_the_ema_of_the_whole_list():
    losses = [1.0, 0.5, float("nan"), 0.8, float("inf"), 0.6, 0.55]
    history = RunHistory(smoothing=0.7)
    history.add([_step(i + 1, loss) for i, loss in enumerate(losses)])
    smoothed = history.loss_frame().query("series != 'raw'").loss.tolist()
    assert smoothed == view.ema(losses, 0.7)


def test_a_step_going_back_asks_for_a_rebuild_which_counts_each_step_once():
    events = [*_run_events(50), {"type": "resumed", "step": 30}, *[_step(s, 9.0) for s in range(31, 61)]]
    history = RunHistory()
    assert not history.add(events)
    rebuilt = RunHistory.from_events(events)
    pd.testing.assert_frame_equal(_sorted(rebuilt.loss_frame()), _sorted(view.loss_frame(events)))
    assert view.progress(rebuilt.events) == view.progress(events)


# ---------------------------------------------------------------- the Run tab on a 100k-step run
STEPS = 100_000
FREEZE_AT = 40_000


@pytest.fixture(scope="module")
def long_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("long") / "long-run"
    run_dir.mkdir()
    _write(run_dir / EVENTS_FILE, _run_events(STEPS, freeze_at=FREEZE_AT))
    return run_dir


def test_a_refresh_of_a_100k_step_run_draws_a_bounded_number_of_points(long_run):
    from app.pages.common import UiContext
    from app.pages.run import _refresh_run

    ctx = UiContext(
        runs_dir=long_run.parent,
        presets_dir=Path("presets"),
        allow_parallel_runs=False,
        configs_dir=long_run.parent.parent / "configs",
    )
    updates = list(_refresh_run(ctx, str(long_run), "", []))
    loss, d, lr = updates[-1][6:9]
    for frame, groups in ((loss, 2), (d, 2), (lr, 2)):
        counts = frame.series.value_counts()
        assert counts.max() <= MAX_POINTS
        assert len(frame) <= groups * MAX_POINTS + 2  # + the freeze rule's two points
        assert frame.step.max() == STEPS  # the newest step is drawn
    rule = d[d.series == f"d frozen at step {FREEZE_AT}"]
    assert list(rule.step) == [FREEZE_AT, FREEZE_AT]
    assert (rule.d.min(), rule.d.max()) == (d.d.min(), d.d.max())
    unet = d[d.series == "unet"]
    assert FREEZE_AT in set(unet.step)  # the freeze step keeps its exact point
    # progress and state as the whole file says
    events = read_events(long_run)
    title, progress = updates[-1][3:5]
    assert "long-run" in title and view.progress_html(view.progress(events)) == progress


def test_new_steps_are_read_incrementally_and_a_resume_rewrite_starts_over(long_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / EVENTS_FILE
    events = _run_events(3_000, freeze_at=1_000)
    _write(path, events)
    first = snapshot(run_dir)
    assert first.frames[0].step.max() == 3_000
    offset = watch(run_dir)._tail.offset
    more = [_step(s, 0.3) for s in range(3_001, 3_101)]
    _append(path, "".join(_line(e) for e in more))
    second = snapshot(run_dir)
    assert watch(run_dir)._tail.offset == path.stat().st_size > offset
    assert second.frames[0].step.max() == 3_100
    assert view.progress(second.events) == view.progress(events + more)
    # resume from step 2000: the trainer rewrites the file without the later events
    kept = [e for e in events if e.get("step", 0) <= 2_000 or e["type"] == "start"]
    _write(path, [*kept, {"type": "resumed", "step": 2_000}, *[_step(s, 0.7) for s in range(2_001, 2_051)]])
    third = snapshot(run_dir)
    assert third.frames[0].step.max() == 2_050
    raw = third.frames[0].query("series == 'raw'")
    assert raw.loss.iloc[-1] == 0.7 and len(raw) <= MAX_POINTS
    assert view.progress(third.events) == view.progress(read_events(run_dir))
