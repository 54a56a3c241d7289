"""How long `python -m trainers` takes to answer when no model is loaded: `--help`, `check` on the demo
preset, and a config error; each a fresh process, wall time, a few repeats.

    HF_HUB_OFFLINE=1 python bench/startup.py                 # this checkout
    HF_HUB_OFFLINE=1 python bench/startup.py --repo /tmp/old # another checkout (e.g. `git archive` of a ref)

`check` is timed twice: "first" with empty layer and memory caches (what a fresh clone's first check
pays: the architecture is built on the meta device once, which imports diffusers), then "cached" (every
later check of that architecture). Two floors are printed for reference: a bare Python, and `import torch`
(the memory estimate and the dataset scan use torch, so `check` cannot be faster than that floor).
The figures depend on the machine and its load: read them side by side, run on the same machine.
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
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - started, done.returncode


def _row(name: str, command: list[str], cwd: Path, env: dict[str, str], repeats: int) -> list[str]:
    times, codes = [], set()
    for _ in range(repeats):
        seconds, code = _time(command, cwd, env)
        times.append(seconds)
        codes.add(code)
    return [name, f"{min(times):.2f}", f"{statistics.median(times):.2f}", ",".join(map(str, sorted(codes)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to time (default: this one)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    repo = args.repo.resolve()
    python = sys.executable
    demo = str(repo / "presets" / "demo.toml")
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
        env["PPSF_DEMO_DIR"] = str(Path(tmp) / "demo")
        check = [python, "-m", "trainers", "check", demo, "--set", f"output_dir={tmp}/runs"]
        rows = [
            _row("python -c pass (floor)", [python, "-c", "pass"], repo, env, args.repeats),
            _row("python -c 'import torch' (floor)", [python, "-c", "import torch"], repo, env, args.repeats),
            _row("--help", [python, "-m", "trainers", "--help"], repo, env, args.repeats),
            _row(
                "config error (--set max_steps=1)", [*check, "--set", "max_steps=1"], repo, env, args.repeats
            ),
        ]
        first = []
        for index in range(args.repeats):  # each with caches of its own, empty
            run_env = dict(env)
            for name in ("PPSF_LAYER_CACHE", "PPSF_MEMORY_CACHE"):
                run_env[name] = str(Path(tmp) / f"{name.lower()}-{index}")
            first.append(_time(check, repo, run_env))
        rows.append(
            [
                "check demo.toml, first (empty caches)",
                f"{min(t for t, _ in first):.2f}",
                f"{statistics.median(t for t, _ in first):.2f}",
                ",".join(sorted({str(c) for _, c in first})),
            ]
        )
        env["PPSF_LAYER_CACHE"] = run_env["PPSF_LAYER_CACHE"]
        env["PPSF_MEMORY_CACHE"] = run_env["PPSF_MEMORY_CACHE"]
        rows.append(_row("check demo.toml, cached", check, repo, env, args.repeats))
    load = os.getloadavg()[0]
    print(f"{repo} on {os.cpu_count()} cores, load average {load:.1f}, {args.repeats} runs each (seconds)")
    print("| command | min | median | exit codes |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
