"""How long `python -m trainers` takes to answer when no model is loaded: `--help`, a config error, and
`check` of every preset; each a fresh process, wall time, a few repeats.

    HF_HUB_OFFLINE=1 python bench/startup.py                 # this checkout, every preset
    HF_HUB_OFFLINE=1 python bench/startup.py --presets demo.toml sdxl_24gb.toml
    HF_HUB_OFFLINE=1 python bench/startup.py --repo /tmp/old # another checkout (e.g. `git archive` of a ref)

Each preset's `check` is timed twice: "first" once, with empty layer and memory caches (what a fresh
clone's first check of it pays: an architecture not seen before is built on the meta device once, which
imports torch and diffusers, and a measurement outside the bundled ones, which hold the SDXL presets', is
made then), and "cached" (every later check of it) `--repeats` times. A cached `check` imports neither torch
nor a model library (tests/test_cli_startup.py holds that), so its floor is Python with pydantic (the config
schema) and Pillow (the dataset scan); the floors printed are a bare Python, that one, and `import torch`
(what `check` would cost if it imported torch). A preset whose model is not on this machine (the real-size
ones, offline) exits with 2 after the same estimate and checks; the time is the same.
The figures depend on the machine and its load (printed before and after): read them side by side, run on
the same machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _time(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    return time.perf_counter() - started, done.returncode


def _row(name: str, runs: list[tuple[float, int]]) -> list[str]:
    times = [seconds for seconds, _ in runs]
    codes = ",".join(sorted({str(code) for _, code in runs}))
    return [name, f"{min(times):.2f}", f"{statistics.median(times):.2f}", codes]


def _repeat(command: list[str], cwd: Path, env: dict[str, str], repeats: int) -> list[tuple[float, int]]:
    return [_time(command, cwd, env) for _ in range(repeats)]


def _load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to time (default: this one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="*", help="preset file names (default: every one in presets/)")
    args = parser.parse_args()
    repo = args.repo.resolve()
    presets = args.presets or sorted(path.name for path in (repo / "presets").glob("*.toml"))
    python, repeats = sys.executable, args.repeats
    load_before = _load()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
        env["PPSF_DEMO_DIR"] = str(Path(tmp) / "demo")

        def check(preset: str) -> list[str]:
            path = str(repo / "presets" / preset)
            return [python, "-m", "trainers", "check", path, "--set", f"output_dir={tmp}/runs"]

        light = "import pydantic, PIL.Image"
        rows = [
            _row("python -c pass (floor)", _repeat([python, "-c", "pass"], repo, env, repeats)),
            _row(f"python -c '{light}' (floor)", _repeat([python, "-c", light], repo, env, repeats)),
            _row(
                "python -c 'import torch' (reference)",
                _repeat([python, "-c", "import torch"], repo, env, repeats),
            ),
            _row("--help", _repeat([python, "-m", "trainers", "--help"], repo, env, repeats)),
            _row(
                "config error (check demo.toml --set max_steps=1)",
                _repeat([*check("demo.toml"), "--set", "max_steps=1"], repo, env, repeats),
            ),
        ]
        for preset in presets:
            preset_env = dict(env)  # caches of its own, empty at first
            for name in ("PPSF_LAYER_CACHE", "PPSF_MEMORY_CACHE"):
                preset_env[name] = str(Path(tmp) / f"{name.lower()}-{preset}")
            rows.append(
                _row(f"check {preset}, first (empty caches)", [_time(check(preset), repo, preset_env)])
            )
            rows.append(_row(f"check {preset}, cached", _repeat(check(preset), repo, preset_env, repeats)))
    print(
        f"{repo} on {os.cpu_count()} cores, load average (1/5/15 min) {load_before} before, {_load()} after; "
        f"{repeats} runs each, first runs once (seconds)"
    )
    print("| command | min | median | exit codes |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
