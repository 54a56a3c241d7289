"""The UI probed as an attacker or a second client would: through its served API on 127.0.0.1.

Config files are confined to the UI's configs folder (and presets for reading); Start and Resume never start
two trainers at once; Stop is sent once per run; handlers called without a valid login say so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from browser_helpers import CHROMIUM, NO_CHROMIUM, free_port, launch_chromium

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-token-value"
SECRET_TOML = f'[tool.secret]\napi_token = "{SECRET}"\n'


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The UI served through launch.py on a free port, its folders in tmp; yields (url, tmp, configs)."""
    from launch import LaunchSettings, launch

    tmp = tmp_path_factory.mktemp("guard")
    presets = tmp / "presets"  # a copy: a broken guard must not overwrite the project's presets
    shutil.copytree(REPO / "presets", presets)
    port = free_port()
    settings = LaunchSettings(
        port=port, runs_dir=tmp / "runs", configs_dir=tmp / "configs", presets_dir=presets
    )
    demo = launch(settings, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", tmp, tmp / "configs"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served[0], verbose=False, analytics_enabled=False)


def _text(result) -> str:
    """Every string in a (nested) API result, joined: what a client got to read."""
    if isinstance(result, str):
        return result
    if isinstance(result, dict):
        return " ".join(_text(v) for v in result.values())
    if isinstance(result, list | tuple):
        return " ".join(_text(v) for v in result)
    return str(result)


# ---------------------------------------------------------------- config files stay in their folders
def test_save_writes_only_inside_the_configs_folder(client, served):
    _, tmp, configs = served
    outside = tmp / "outside"
    outside.mkdir(exist_ok=True)
    decoy = tmp / "pyproject.toml"  # configs/../pyproject.toml
    decoy.write_text("[project]\nname = 'other'\n")
    victim = outside / "victim.toml"
    victim.write_text("keep = 1\n")
    (configs / "link.toml").symlink_to(victim)
    (configs / "linked-dir").symlink_to(outside, target_is_directory=True)
    etc_target = Path("/etc/ppsf-guard-test.toml")
    attempts = [
        str(etc_target),
        str(outside / "new.toml"),
        "../pyproject.toml",
        "../../pyproject.toml",
        str(configs / ".." / "pyproject.toml"),
        "link.toml",
        "linked-dir/new.toml",
        str(configs / "linked-dir" / "new.toml"),
    ]
    try:
        for typed in attempts:
            result = client.predict(typed, api_name="/save_file")
            assert "Not saved" in _text(result), (typed, result)
            assert "configs" in _text(result)  # says where it may save
        assert not etc_target.exists()
        assert not (outside / "new.toml").exists()
        assert decoy.read_text() == "[project]\nname = 'other'\n"
        assert victim.read_text() == "keep = 1\n"
        assert (configs / "link.toml").is_symlink()
    finally:
        etc_target.unlink(missing_ok=True)


def test_save_and_load_inside_the_configs_folder(client, served):
    _, _, configs = served
    result = client.predict("mine.toml", api_name="/save_file")
    assert "Saved to" in _text(result), result
    assert 'name = "demo"' in (configs / "mine.toml").read_text()
    (configs / "sub").mkdir(exist_ok=True)
    assert "Saved to" in _text(client.predict("sub/two.toml", api_name="/save_file"))
    assert (configs / "sub" / "two.toml").is_file()
    assert "Loaded" in _text(client.predict("mine.toml", api_name="/load_file"))
    assert "Loaded" in _text(client.predict(str(configs / "sub" / "two.toml"), api_name="/load_file"))
    # presets are readable by their full path, never writable
    preset = served[1] / "presets" / "demo.toml"
    before = preset.read_bytes()
    assert "Loaded" in _text(client.predict(str(preset), api_name="/load_file"))
    assert "Not saved" in _text(client.predict(str(preset), api_name="/save_file"))
    assert preset.read_bytes() == before


def test_load_reads_nothing_outside_and_echoes_no_content(client, served):
    _, tmp, configs = served
    secret_dir = tmp / "secret"
    secret_dir.mkdir(exist_ok=True)
    secret = secret_dir / "secret.toml"
    secret.write_text(SECRET_TOML)
    (configs / "secret-link.toml").symlink_to(secret)
    (configs / "not-a-config.toml").write_text(SECRET_TOML)
    (configs / "broken.toml").write_text(f'name = "{SECRET}\n')  # unterminated string
    (configs / "latin1.toml").write_bytes(f'name = "{SECRET}\xe9"\n'.encode("latin-1"))
    for typed in [
        str(secret),
        "../secret/secret.toml",
        "/etc/ppsf-missing.toml",
        "secret-link.toml",
        "not-a-config.toml",
        "broken.toml",
        "latin1.toml",
        str(REPO / "pyproject.toml"),
    ]:
        result = client.predict(typed, api_name="/load_file")
        text = _text(result)
        assert "Nothing loaded" in text, (typed, result)
        for leaked in (SECRET, "api_token", "tool", "secret]", "project", "ppsf-trainer =", "requires"):
            assert leaked not in text.replace(str(tmp), "").replace(typed, ""), (typed, leaked, text)
    # the upload button only takes files a browser uploaded, not a path on the server
    import httpx

    url = served[0].rstrip("/")
    file_data = {"path": str(secret), "meta": {"_type": "gradio.FileData"}}
    event = httpx.post(f"{url}/gradio_api/call/upload_config", json={"data": [file_data]}, timeout=30)
    answer = httpx.get(f"{url}/gradio_api/call/upload_config/{event.json()['event_id']}", timeout=60).text
    assert "event: error" in answer and "not uploaded by a user" in answer and SECRET not in answer
    # outside the folders the answer is the same whether the file exists or not: no probing
    exists = _text(client.predict(str(secret), api_name="/load_file"))
    missing = _text(client.predict(str(secret_dir / "none.toml"), api_name="/load_file"))
    assert exists.replace("secret.toml", "X") == missing.replace("none.toml", "X")


# ---------------------------------------------------------------- one run at a time, under concurrency
RACE_TRIALS = 12
HARMLESS = "import sys, time; time.sleep(60)"  # argv still holds "trainers", so it counts as one


def _harmless_command(action: str, target: Path, gpus: int = 1) -> list[str]:
    return [sys.executable, "-c", HARMLESS, "trainers", action, str(target)]


def _tiny_config(runs_dir: Path, name: str):
    from trainers.config import validate_config

    return validate_config(
        {
            "name": name,
            "output_dir": str(runs_dir),
            "model": {"path": "demo://tiny-sdxl"},
            "dataset": {"path": "demo://shapes"},
            "training": {"max_steps": 1},
        }
    )


def _resumable_run(runs_dir: Path, name: str) -> Path:
    from trainers.config import dump_config

    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(dump_config(_tiny_config(runs_dir, name)))
    return run_dir


def _stop_all(runs_dir: Path) -> None:
    from app import runner

    for run_dir in runner.running_runs(runs_dir):
        pid = runner.trainer_pid(run_dir)
        os.kill(pid, signal.SIGKILL)
        runner.wait_for_exit(run_dir, 30)


def test_start_racing_resume_never_starts_two_trainers(tmp_path, monkeypatch):
    from app import runner

    monkeypatch.setattr(runner, "trainer_command", _harmless_command)
    for trial in range(RACE_TRIALS):
        runs_dir = tmp_path / f"trial-{trial}"
        resumables = [_resumable_run(runs_dir, f"old-{i}") for i in range(2)]
        barrier = threading.Barrier(4)
        outcomes: list[str] = []

        def attempt(call, *args, barrier=barrier, outcomes=outcomes):
            barrier.wait(timeout=30)
            try:
                call(*args)
                outcomes.append("started")
            except runner.RunnerError as error:
                outcomes.append(str(error))

        threads = [
            threading.Thread(target=attempt, args=(runner.start_run, _tiny_config(runs_dir, f"new-{i}")))
            for i in range(2)
        ] + [threading.Thread(target=attempt, args=(runner.resume_run, r)) for r in resumables]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert outcomes.count("started") == 1, (trial, outcomes)
            assert all("one at a time" in o for o in outcomes if o != "started"), outcomes
            assert len(runner.running_runs(runs_dir)) == 1
        finally:
            _stop_all(runs_dir)


_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
open(sys.argv[2], "w").close()
"""


def test_the_lock_holds_against_another_ui_process(tmp_path, monkeypatch):
    """Another process (a second or restarted UI) holding runs/.ui.lock makes a Start wait for it."""
    from app import runner

    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    released = tmp_path / "released"
    seen_release: list[bool] = []

    def command(action: str, target: Path, gpus: int = 1) -> list[str]:
        seen_release.append(released.exists())
        return _harmless_command(action, target)

    monkeypatch.setattr(runner, "trainer_command", command)
    waiting = threading.Event()
    real_flock = fcntl.flock

    def flock(fd, operation):
        waiting.set()  # the starter is about to wait for the lock
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(runs_dir / runner.LOCK_FILE), str(released)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        starter = threading.Thread(target=runner.start_run, args=(_tiny_config(runs_dir, "x"),))
        starter.start()
        assert waiting.wait(timeout=30), "start_run never asked for the lock"
        holder.stdin.close()  # the holder marks its release, then exits (and the system frees the lock)
        holder.wait(timeout=30)
        starter.join(timeout=60)
        assert seen_release == [True]  # the spawn came only after the other process let go
    finally:
        holder.kill()
        holder.wait()
        _stop_all(runs_dir)


# ---------------------------------------------------------------- Stop is sent once; the title follows the events
# A stand-in trainer that ignores Ctrl-C, and says so by a file in its run folder once it does.
IGNORES_SIGINT = (
    "import pathlib, signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "pathlib.Path(sys.argv[-1], 'ignoring').touch(); time.sleep(60)"
)


def _resume_ignoring_trainer(run_dir: Path) -> int:
    from app import runner

    (run_dir / "ignoring").unlink(missing_ok=True)
    runner.resume_run(run_dir)
    deadline = time.monotonic() + 30
    while not (run_dir / "ignoring").exists():
        assert time.monotonic() < deadline, "the stand-in trainer did not start"
        time.sleep(0.05)
    return runner.trainer_pid(run_dir)


@pytest.fixture
def sent_signals(monkeypatch):
    """The (pid, signal) pairs the runner sends (existence probes with signal 0 left out)."""
    sent: list[tuple[int, int]] = []
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        if sig != 0:
            sent.append((pid, sig))
        real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    return sent


def _ignoring_trainer(action: str, target: Path, gpus: int = 1) -> list[str]:
    return [sys.executable, "-c", IGNORES_SIGINT, "trainers", action, str(target)]


def test_stop_pressed_many_times_sends_one_sigint(tmp_path, monkeypatch, sent_signals):
    from app import runner
    from app.pages.common import UiContext
    from app.pages.run import _stop

    monkeypatch.setattr(runner, "trainer_command", _ignoring_trainer)
    runs_dir = tmp_path / "runs"
    run_dir = _resumable_run(runs_dir, "busy")
    ctx = UiContext(runs_dir=runs_dir, presets_dir=tmp_path, allow_parallel_runs=False, configs_dir=tmp_path)
    try:
        first_pid = _resume_ignoring_trainer(run_dir)
        barrier = threading.Barrier(6)
        answers: list[str] = []

        def press() -> None:
            barrier.wait(timeout=30)
            answers.append(runner.request_stop(run_dir))

        presses = [threading.Thread(target=press) for _ in range(6)]
        for thread in presses:
            thread.start()
        for thread in presses:
            thread.join(timeout=60)
        assert sorted(answers) == ["already stopping"] * 5 + ["sent"]
        assert sent_signals == [(first_pid, signal.SIGINT)]
        # the page's answer to another press, and after a UI restart (only the run folder remembers)
        assert "already stopping" in _stop(ctx, str(run_dir))
        restarted_away = dict(runner._children)
        runner._children.clear()
        assert runner.request_stop(run_dir) == "already stopping"
        assert sent_signals == [(first_pid, signal.SIGINT)]
        # a new trainer in the folder gets its own, single stop
        os.kill(first_pid, signal.SIGKILL)
        restarted_away[first_pid].wait(timeout=30)
        assert runner.wait_for_exit(run_dir, 30)
        sent_signals.clear()
        second_pid = _resume_ignoring_trainer(run_dir)
        assert second_pid != first_pid
        assert runner.request_stop(run_dir) == "sent"
        assert runner.request_stop(run_dir) == "already stopping"
        assert sent_signals == [(second_pid, signal.SIGINT)]
    finally:
        _stop_all(runs_dir)
    assert runner.request_stop(run_dir) == "not running"
    assert "Nothing to stop" in _stop(ctx, str(run_dir))


def test_kill_now_sends_the_second_signal_that_aborts(tmp_path, monkeypatch, sent_signals):
    from app import runner

    monkeypatch.setattr(runner, "trainer_command", _ignoring_trainer)
    runs_dir = tmp_path / "runs"
    run_dir = _resumable_run(runs_dir, "busy")
    try:
        pid = _resume_ignoring_trainer(run_dir)
        assert runner.request_stop(run_dir) == "sent"
        assert runner.abort_run(run_dir)
        assert sent_signals == [(pid, signal.SIGINT), (pid, signal.SIGTERM)]  # no SIGKILL
        assert runner.wait_for_exit(run_dir, 30)  # SIGTERM's default action ends this stand-in
    finally:
        _stop_all(runs_dir)
    assert not runner.abort_run(run_dir)


def _events_until_stop(stop: dict, checkpoint_step: int | None, resumed_from: int | None = None) -> list:
    events: list[dict] = [{"type": "start", "step": 0}]
    events += [{"type": "step", "step": s} for s in (1, 2, 3)]
    if resumed_from is not None:
        events += [
            {"type": "checkpoint", "step": resumed_from, "path": "/r/step-3"},
            {"type": "start", "step": 0},
            {"type": "resumed", "step": resumed_from},
        ]
    if checkpoint_step is not None:
        events.append({"type": "checkpoint", "step": checkpoint_step, "path": "/r/x"})
    return [*events, stop]


@pytest.mark.parametrize(
    ("events", "words"),
    [
        (
            _events_until_stop(
                {"type": "stopped", "step": 3, "message": "stopped on request; checkpoint saved"}, 3
            ),
            "stopped (checkpoint saved at step 3)",
        ),
        (
            _events_until_stop(
                {"type": "stopped", "step": 0, "message": "stopped before the first step; nothing to save"},
                None,
            ),
            "stopped (no checkpoint saved: stopped before the first step; nothing to save)",
        ),
        (  # a checkpoint of an earlier session is not one saved at this stop
            _events_until_stop(
                {"type": "stopped", "step": 3, "message": "stopped before the first step; nothing to save"},
                None,
                resumed_from=3,
            ),
            "stopped (no checkpoint saved: stopped before the first step; nothing to save)",
        ),
        (
            _events_until_stop(
                {"type": "stopped", "message": "aborted by a second Ctrl-C", "last_checkpoint": None}, 2
            ),
            "stopped (no checkpoint saved: aborted by Kill now)",  # the UI names its button, not Ctrl-C
        ),
        (  # the stop's message alone is not believed
            _events_until_stop(
                {"type": "stopped", "step": 3, "message": "stopped on request; checkpoint saved"}, 2
            ),
            "stopped (no checkpoint saved: stopped on request; checkpoint saved)",
        ),
    ],
)
def test_the_title_names_a_checkpoint_only_when_an_event_says_so(tmp_path, events, words):
    from app.run_view import RunSnapshot

    snap = RunSnapshot(run_dir=tmp_path, state="stopped", alive=False, events=events, log="", frames=[])
    assert snap.title.startswith(f"**{tmp_path.name}** — {words}")


# ---------------------------------------------------------------- Gradio's session controls need the login
USER, PASSWORD = "alice", "correct horse"


@pytest.fixture(scope="module")
def served_with_auth(tmp_path_factory):
    from launch import LaunchSettings, launch

    tmp = tmp_path_factory.mktemp("auth")
    port = free_port()
    settings = LaunchSettings(
        port=port, runs_dir=tmp / "runs", configs_dir=tmp / "configs", auth=(USER, PASSWORD)
    )
    demo = launch(settings, block=False)
    try:
        yield f"http://127.0.0.1:{port}", demo
    finally:
        demo.close()


def _session_control_answers(http, url: str) -> list[int]:
    """Status codes of /cancel, /reset and a heartbeat for some session."""
    cancel = {"session_hash": "victim-session", "fn_index": 0, "event_id": "0" * 32}
    codes = [
        http.post(f"{url}/gradio_api/cancel", json=cancel).status_code,
        http.post(f"{url}/gradio_api/reset", json={"event_id": "0" * 32}).status_code,
    ]
    with http.stream("GET", f"{url}/gradio_api/heartbeat/victim-session") as response:
        codes.append(response.status_code)
    return codes


def test_session_controls_need_the_login_under_auth(served_with_auth):
    import httpx

    url, _ = served_with_auth
    with httpx.Client(timeout=30) as anonymous:
        assert _session_control_answers(anonymous, url) == [401, 401, 401]
        assert anonymous.get(f"{url}/gradio_api/info").status_code == 401  # as Gradio's own API routes
        wrong = anonymous.post(f"{url}/login", data={"username": USER, "password": "wrong"})
        assert wrong.status_code == 400
        assert _session_control_answers(anonymous, url) == [401, 401, 401]
    with httpx.Client(timeout=30) as user:
        assert user.post(f"{url}/login", data={"username": USER, "password": PASSWORD}).status_code == 200
        assert _session_control_answers(user, url) == [200, 200, 200]


def test_session_controls_stay_open_without_auth(served):
    import httpx

    with httpx.Client(timeout=30) as http:
        assert _session_control_answers(http, served[0].rstrip("/")) == [200, 200, 200]


# ---------------------------------------------------------------- logging out under --auth
@contextlib.contextmanager
def _logged_in_client(url: str):
    import httpx

    with httpx.Client(timeout=30) as http:
        assert http.post(f"{url}/login", data={"username": USER, "password": PASSWORD}).status_code == 200
        yield http


def test_logout_ends_only_the_login_of_the_browser_that_asks(served_with_auth):
    import httpx

    url, _ = served_with_auth
    with _logged_in_client(url) as first, _logged_in_client(url) as second:
        kept_cookies = dict(first.cookies)  # on plain http only the "unsecure" cookie is ever sent
        assert first.get(f"{url}/logout", follow_redirects=False).status_code == 302
        assert first.get(f"{url}/gradio_api/login_check").status_code == 401
        with httpx.Client(timeout=30, cookies=kept_cookies) as replay:  # the old cookie is dead too
            assert replay.get(f"{url}/gradio_api/login_check").status_code == 401
        assert second.get(f"{url}/gradio_api/login_check").status_code == 200
        assert second.get(f"{url}/gradio_api/info").status_code == 200
        # asking for every session to end changes nothing
        assert second.get(f"{url}/logout?all_session=true", follow_redirects=False).status_code == 302
    with _logged_in_client(url) as third, _logged_in_client(url) as fourth:
        third.get(f"{url}/logout?all_session=true", follow_redirects=False)
        assert fourth.get(f"{url}/gradio_api/login_check").status_code == 200


def test_a_page_whose_login_ended_is_told_to_log_in_again(served_with_auth):
    """Without a login nothing reaches a handler (Gradio answers 401), so the page itself watches its
    login and says so; here: the page gets the watcher, and the route it asks answers as it expects."""
    import httpx

    from launch import LOGIN_WATCH_JS

    url, _ = served_with_auth
    with _logged_in_client(url) as user:
        config = user.get(f"{url}/config").json()
        assert "ppsf-logged-out" in str(config.get("head")) and "gradio_api/login_check" in LOGIN_WATCH_JS
        assert user.get(f"{url}/gradio_api/login_check").status_code == 200
    with httpx.Client(timeout=30) as anonymous:
        assert anonymous.get(f"{url}/gradio_api/login_check").status_code == 401
        join = {"data": [], "fn_index": 0, "session_hash": "s", "event_id": None, "trigger_id": None}
        assert anonymous.post(f"{url}/gradio_api/queue/join", json=join).status_code == 401


def test_browser_tab_logged_out_elsewhere_says_so_and_shows_the_login(served_with_auth):
    """Two tabs of one browser share a login: logging out in one ends it for both; the other tab says so
    and reloads to the login form (in the browser, when chromium and playwright are there)."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(NO_CHROMIUM)
    url = served_with_auth[0] + "/"
    with playwright_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            context = browser.new_context()
            first = context.new_page()
            first.goto(url, wait_until="load")
            first.locator("input[type=text]").fill(USER)
            first.locator("input[type=password]").fill(PASSWORD)
            first.get_by_role("button", name="Login").click()
            first.wait_for_selector("#field-training-max_steps", timeout=60_000)
            second = context.new_page()
            second.goto(url, wait_until="load")
            second.wait_for_selector("#field-training-max_steps", timeout=60_000)
            # the note shows for 3 s before the reload: a busy machine may starve the test's polling for
            # longer, so the page itself records the note's text where the reload keeps it
            second.evaluate(
                """() => new MutationObserver(() => {
                    const note = document.getElementById("ppsf-logged-out");
                    if (note) sessionStorage.setItem("ppsf-note", note.textContent);
                }).observe(document.body, {childList: true})"""
            )
            first.goto(url + "logout", wait_until="load")
            playwright_api.expect(second.get_by_role("button", name="Login")).to_be_visible(timeout=60_000)
            assert "logged out" in (second.evaluate("() => sessionStorage.getItem('ppsf-note')") or "")
            assert second.locator("#field-training-max_steps").count() == 0
        finally:
            browser.close()


# ---------------------------------------------------------------- the form kept in the browser
def _demo_form() -> tuple[list, list]:
    from app import config_form as form

    specs = form.form_fields()
    data, problems = form.read_toml(REPO / "presets" / "demo.toml")
    assert not problems
    return specs, form.values_from_config(data, specs)


def test_the_kept_form_restores_every_edited_field():
    from app import config_form as form

    specs, values = _demo_form()
    keys = [s.key for s in specs]
    edited = list(values)
    edited[keys.index("training.max_steps")] = "1234"
    edited[keys.index("sampling.prompts")] = "a red cube\na blue ball"
    edited[keys.index("training.precision")] = "bf16"
    edited[keys.index("dataset.shuffle_tags")] = not values[keys.index("dataset.shuffle_tags")]
    edited[keys.index("lora.rank")] = 4
    saved = json.loads(json.dumps(form.form_snapshot(edited, specs)))  # what local storage gives back
    restored = form.restorable_values(saved, specs)
    assert "output_dir" not in saved and "output_dir" not in restored  # the runs folder is the UI's own
    assert {key: restored[key] for key in restored} == {
        key: value for key, value in zip(keys, edited) if key != "output_dir"
    }
    config, problems = form.validate_values(
        [restored.get(key, value) for key, value in zip(keys, values)], specs
    )
    assert problems == [] and config.training.max_steps == 1234 and config.lora.rank == 4


def test_the_kept_form_drops_what_does_not_fit_todays_fields():
    from app import config_form as form

    specs, _ = _demo_form()
    saved = {
        "training.max_steps": "77",
        "training.no_such_field": "x",  # a field since removed
        "training.precision": "fp64",  # a choice that is not offered
        "saving.formats": ["kohya", "ckpt"],
        "dataset.shuffle_tags": "yes",  # not a checkbox value
        "lora.rank": True,
        "output_dir": "/elsewhere",
        "name": ["not", "text"],
    }
    assert form.restorable_values(saved, specs) == {"training.max_steps": "77"}
    assert form.restorable_values(None, specs) == {}
    assert form.restorable_values(["a", "list"], specs) == {}


def test_restore_handler_fills_only_kept_fields(tmp_path):
    import gradio as gr

    from app.pages.common import UiContext
    from app.pages.setup import browser_secret, restore_form

    ctx = UiContext(runs_dir=tmp_path, presets_dir=tmp_path, allow_parallel_runs=False, configs_dir=tmp_path)
    keys = [s.key for s in ctx.specs]
    nothing = restore_form(ctx, None)
    assert len(nothing) == len(keys) + 1 and all(isinstance(u, type(gr.skip())) for u in nothing)
    updates = restore_form(ctx, {"training.max_steps": "42"})
    assert updates[keys.index("training.max_steps")] == "42"
    assert sum(not isinstance(u, type(gr.skip())) for u in updates[:-1]) == 1
    assert "Restored" in updates[-1]
    secret = browser_secret(tmp_path)
    assert secret == browser_secret(tmp_path) and len(secret) >= 24  # the same after a restart
    assert (tmp_path / ".ui-browser-secret").stat().st_mode & 0o077 == 0


def test_browser_form_edits_survive_a_ui_restart(tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(NO_CHROMIUM)
    from launch import LaunchSettings, launch

    settings = LaunchSettings(port=free_port(), runs_dir=tmp_path / "runs", configs_dir=tmp_path / "configs")
    url = f"http://127.0.0.1:{settings.port}/"
    demo = launch(settings, block=False)
    try:
        with playwright_api.sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = browser.new_page()
                page.goto(url, wait_until="load")
                field = page.locator("#field-training-max_steps").locator("input, textarea").first
                field.wait_for(timeout=60_000)
                page.wait_for_timeout(1000)  # the page's own load events first
                stored = "() => Object.keys(localStorage).some(k => k.startsWith('ppsf-setup-form-'))"
                field.fill("4321")
                field.press("Tab")
                page.wait_for_function(stored, timeout=30_000)
                page.wait_for_timeout(1000)  # the last edit's round trip
                demo.close()
                demo = launch(settings, block=False)  # a restarted UI, same runs folder and address
                page.reload(wait_until="load")
                playwright_api.expect(field).to_have_value("4321", timeout=30_000)
                playwright_api.expect(page.locator("#setup-message")).to_contain_text("Restored")
            finally:
                browser.close()
    finally:
        demo.close()


def test_ui_builds_with_its_configs_folder_and_a_confirmed_kill(tmp_path):
    from app.ui import build_ui

    demo = build_ui(runs_dir=tmp_path / "runs")
    assert (tmp_path / "configs").is_dir()  # default: beside the runs folder
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"kill", "kill-confirm", "kill-cancel", "kill-confirm-row", "toml-path"} <= ids
    row = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "kill-confirm-row")
    assert row.visible is False  # the kill itself is one more, deliberate click away


def test_resume_of_a_run_stopped_before_it_wrote_its_config_says_to_start_it_again(tmp_path, monkeypatch):
    from app import runner

    monkeypatch.setattr(runner, "trainer_command", _harmless_command)
    run_dir = tmp_path / "runs" / "early"
    run_dir.mkdir(parents=True)
    (run_dir / runner.REQUEST_FILE).write_text('name = "early"\n')  # all a trainer stopped at import leaves
    (run_dir / runner.LOG_FILE).write_text("KeyboardInterrupt\n")
    with pytest.raises(runner.RunnerError, match="Start it again.*same name") as refused:
        runner.resume_run(run_dir)
    assert "config.toml" in str(refused.value)
    assert not runner.holds_run(run_dir)  # so the same name may start again


# ---------------------------------------------------------------- idle CPU
def test_an_idle_server_polls_its_queue_gently(tmp_path):
    """Gradio's 1 ms idle poll cost ~4.5 s of CPU a minute with no page open; the served queue polls at 50 ms."""
    import inspect

    from gradio.queueing import Queue

    from launch import QUEUE_IDLE_POLL_SECONDS, LaunchSettings, launch

    source = inspect.getsource(Queue)
    for name in QUEUE_IDLE_POLL_SECONDS:  # a Gradio that renamed them would silently poll fast again
        assert f"self.{name}" in source
    settings = LaunchSettings(port=free_port(), runs_dir=tmp_path / "runs", configs_dir=tmp_path / "configs")
    demo = launch(settings, block=False)
    try:
        for name, seconds in QUEUE_IDLE_POLL_SECONDS.items():
            assert getattr(demo._queue, name) == seconds
    finally:
        demo.close()
