"""The UI probed as an attacker or a second client would: through its served API on 127.0.0.1.

Config files are confined to the UI's configs folder (and presets for reading); Start and Resume never start
two trainers at once; Stop is sent once per run; handlers called without a valid login say so.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-token-value"
SECRET_TOML = f'[tool.secret]\napi_token = "{SECRET}"\n'


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The UI served through launch.py on a free port, its folders in tmp; yields (url, tmp, configs)."""
    from launch import LaunchSettings, launch

    tmp = tmp_path_factory.mktemp("guard")
    presets = tmp / "presets"  # a copy: a broken guard must not overwrite the project's presets
    shutil.copytree(REPO / "presets", presets)
    port = _free_port()
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
    # outside the folders the answer is the same whether the file exists or not: no probing
    exists = _text(client.predict(str(secret), api_name="/load_file"))
    missing = _text(client.predict(str(secret_dir / "none.toml"), api_name="/load_file"))
    assert exists.replace("secret.toml", "X") == missing.replace("none.toml", "X")
