"""Live controls of a running trainer from the Run page: freeze d now, sample now, checkpoint now (and Stop
for a trainer the UI did not start), through trainers.control; the trainer acknowledges each request with
a `control` event, which the page shows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from app import runner
from trainers.control import CONTROL_DIR, ControlError, request_control, trainer_running

Event = dict[str, Any]

ACTION_WORDS = {"freeze": "freeze d", "sample": "sample", "checkpoint": "checkpoint", "stop": "stop"}
SHOWN_ACKNOWLEDGEMENTS = 5


def send(run_dir: Path | None, action: str) -> str:
    """Ask the run's trainer to `action` after its current step; the answer as Markdown (a refusal says
    why and what to do)."""
    words = ACTION_WORDS.get(action, action)
    if run_dir is None:
        return f"**Cannot {words} now:** there is no run yet; start one first."
    if not trainer_running(run_dir):
        if runner.trainer_pid(run_dir) is not None:
            return (
                f"**Cannot {words} now:** {run_dir.name} is still starting (its trainer has not taken the "
                "run yet); try again in a moment."
            )
        return (
            f"**Cannot {words} now:** {run_dir.name} is not running. Controls act on a training run; "
            "press Resume to continue it first."
        )
    try:
        request_control(run_dir, action)
    except ControlError as error:
        return f"**Cannot {words} now:** {error}"
    return (
        f"**{words.capitalize()}** requested for {run_dir.name}: the trainer acts on it after its current "
        "step and acknowledges it below."
    )


def pending_actions(run_dir: Path) -> list[str]:
    """The actions requested and not acknowledged yet, oldest first."""
    folder = Path(run_dir) / CONTROL_DIR
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
    return [name.removesuffix(".json").partition("-")[2] for name in names]


def acknowledgements(events: list[Event], limit: int = SHOWN_ACKNOWLEDGEMENTS) -> list[Event]:
    """The newest `control` events, newest first."""
    found = [event for event in events if event.get("type") == "control"]
    return found[::-1][:limit]


def acknowledgements_markdown(run_dir: Path | None, events: list[Event]) -> str:
    """Waiting requests and the trainer's newest answers, as Markdown ("" when there are none)."""
    if run_dir is None:
        return ""
    lines = [
        f"- ⏳ {ACTION_WORDS.get(a, a)}: waiting for the trainer's next step"
        for a in pending_actions(run_dir)
    ]
    for event in acknowledgements(events):
        action = ACTION_WORDS.get(str(event.get("action")), str(event.get("action")))
        mark = "✔" if event.get("status") == "done" else "✘ refused"
        at = f"step {event['step']}" if isinstance(event.get("step"), int) else "at exit"
        when = _clock(event.get("time"))
        lines.append(f"- {mark} **{action}** ({at}{when}): {event.get('message', '')}")
    return ("**Live controls:**\n" + "\n".join(lines)) if lines else ""


def _clock(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return ""
    return ", " + time.strftime("%H:%M:%S", time.localtime(seconds))
