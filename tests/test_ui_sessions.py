"""A closed page leaves nothing behind on the server: the UI served on 127.0.0.1 and driven by
gradio_client, which opens a page's heartbeat as a browser does and closes it on close()."""

from __future__ import annotations

import json
import time

import pytest

from trainers.distributed import free_port
from trainers.events import EVENTS_FILE


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """(url, demo) of the UI serving a runs folder with one short run."""
    from launch import LaunchSettings, launch

    monkeypatch.setenv("PPSF_DEMO_DIR", str(tmp_path / "demo"))
    run_dir = tmp_path / "runs" / "short"
    run_dir.mkdir(parents=True)
    events = [{"type": "start", "step": 0, "total_steps": 10}]
    events += [
        {"type": "step", "step": s, "loss": 1 / s, "groups": [{"name": "unet", "d": 1e-4}]}
        for s in range(1, 6)
    ]
    (run_dir / EVENTS_FILE).write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    port = free_port()
    demo = launch(LaunchSettings(port=port, runs_dir=tmp_path / "runs"), block=False)
    try:
        yield f"http://127.0.0.1:{port}/", demo
    finally:
        demo.close()


def test_a_closed_page_releases_its_session(served):
    from gradio_client import Client

    url, demo = served
    sessions = demo.state_holder.session_data
    client = Client(url, verbose=False, analytics_enabled=False)
    loads = [d for d in client.config["dependencies"] if "load" in [event for _, event in d["targets"]]]
    load = next(d for d in loads if d["api_name"].startswith("redraw"))  # the Run tab's draw (not the form's)
    result = client.predict(api_name=f"/{load['api_name']}")  # the page's first draw
    assert "short" in json.dumps(result, default=str)
    _wait_for(lambda: client.session_hash in sessions, 10, "the page's session")
    assert sessions[client.session_hash].config_values  # it holds what was sent to the page, plots included
    client.close()  # the page closes: its heartbeat ends
    _wait_for(lambda: client.session_hash not in sessions, 30, "the closed page's session to be released")
