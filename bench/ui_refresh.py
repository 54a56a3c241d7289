"""The Run tab's refresh on a long run: the whole-file path it had before vs the incremental one.

Writes a synthetic events.jsonl of 100k steps (with samples, checkpoints and a d freeze, lines as the
trainer writes them) and prints one table:
- first refresh: seconds for a page's first full redraw;
- next refresh: seconds per refresh after 100 new steps were appended (median of 5);
- plot points: rows sent to the three plots; plot data: their JSON bytes, as Gradio sends them;
- server RSS growth after 20 pages opened (each drawing the run once) and closed: each path served by
  launch.py in a child process and driven by gradio_client, which opens and closes a page's heartbeat as
  a browser does. "before" is served from a `git archive` of --before-ref (the commit before this change).

"before" refresh below is the old path, copied here so it stays reproducible: read_events() of the whole
file, then the whole-list views (loss_frame, d_frame, lr_frame, progress, notices, sample_images).

    python bench/ui_refresh.py [--steps 100000] [--pages 20] [--before-ref 1851075] [--no-serve]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402

from app import events_view as view  # noqa: E402
from app.ui import LOG_LINES, UiContext, _refresh_run  # noqa: E402
from trainers.events import EVENTS_FILE, read_events  # noqa: E402

BEFORE_REF = "1851075"  # the commit before the incremental refresh
GROUPS = ("unet", "text_encoder")


# ---------------------------------------------------------------- a synthetic long run
def step_event(step: int, rng: random.Random, d: float, now: float) -> dict:
    """A step event with the fields and sizes the trainer writes (trainers/train.py _log_step)."""
    loss = 0.12 + 0.05 * rng.random() + (0.8 if rng.random() < 1e-4 else 0.0)  # rare spikes
    return {
        "type": "step",
        "time": round(now, 3),
        "step": step,
        "epoch": step // 250,
        "loss": loss,
        "groups": [
            {"name": name, "d": d * (1 + i), "lr": d * (1 + i) * 0.5} for i, name in enumerate(GROUPS)
        ],
        "step_seconds": round(0.05 + 0.01 * rng.random(), 4),
        "samples_per_second": round(20 + rng.random(), 3),
        "peak_memory_mb": 812.4,
    }


def write_run(run_dir: Path, steps: int, seed: int = 0) -> None:
    """events.jsonl of a run of `steps` steps: samples every 500, checkpoints every 1000, d frozen at 40%."""
    rng, now, d = random.Random(seed), 1.7e9, 1e-6
    freeze_at = int(steps * 0.4)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / EVENTS_FILE).open("w", encoding="utf-8") as file:

        def write(event: dict) -> None:
            file.write(json.dumps(event) + "\n")

        write({"type": "dataset", "images": 40, "missing_captions": 0, "skipped": [], "time": now})
        write({"type": "start", "step": 0, "total_steps": steps * 2, "device": "cpu", "time": now})
        for step in range(1, steps + 1):
            now += 0.06
            d = d if step > freeze_at else min(3e-2, d * 1.001)
            write(step_event(step, rng, d, now))
            if step == freeze_at:
                write({"type": "freeze", "step": step, "since_step": step, "d": [d, 2 * d], "time": now})
            if step % 500 == 0:
                paths = [str(run_dir / "samples" / f"{step:06d}-{i}.png") for i in range(2)]
                write({"type": "sample", "step": step, "paths": paths, "prompts": ["a", "b"], "time": now})
            if step % 1000 == 0:
                path = str(run_dir / "checkpoints" / f"step-{step:06d}")
                write({"type": "checkpoint", "step": step, "path": path, "time": now})
    (run_dir / "train.log").write_text("training\n", encoding="utf-8")


def append_steps(run_dir: Path, count: int) -> None:
    last = read_last_step(run_dir)
    rng = random.Random(last)
    with (run_dir / EVENTS_FILE).open("a", encoding="utf-8") as file:
        for step in range(last + 1, last + count + 1):
            file.write(json.dumps(step_event(step, rng, 1e-2, 1.8e9 + step)) + "\n")


def read_last_step(run_dir: Path) -> int:
    with (run_dir / EVENTS_FILE).open("rb") as file:
        file.seek(-4096, os.SEEK_END)
        lines = file.read().splitlines()
    return max(json.loads(line)["step"] for line in lines[1:] if b'"type": "step"' in line)


# ---------------------------------------------------------------- before: the whole-file refresh (copied)
def before_sample_images(events: list[dict], limit: int = 48) -> list[tuple[str, str]]:
    images = []
    for event in events:
        if event.get("type") != "sample":
            continue
        prompts = event.get("prompts") or []
        for index, path in enumerate(event.get("paths") or []):
            prompt = prompts[index] if index < len(prompts) else ""
            images.append((str(path), f"step {event.get('step')}: {prompt}"))
    images = [item for item in images if os.path.isfile(item[0])]
    return images[::-1][:limit]


def before_refresh(run_dir: Path) -> list:
    """What the Run tab computed per refresh before: every event read and every view built from them."""
    events = read_events(run_dir)
    frames = [view.loss_frame(events), view.d_frame(events), view.lr_frame(events)]
    state = view.run_state(events, alive=True)
    return [
        view.progress_html(view.progress(events)),
        view.notices_markdown(events, state),
        *[frame if len(frame) else None for frame in frames],
        before_sample_images(events),
    ]


def after_refresh(run_dir: Path) -> list:
    """The Run tab's refresh now (app.ui._refresh_run), forced to redraw (as a page's first draw)."""
    ctx = UiContext(runs_dir=run_dir.parent, presets_dir=REPO / "presets", allow_parallel_runs=False)
    updates = list(_refresh_run(ctx, str(run_dir), "", []))
    return updates[-1][4:6] + updates[-1][6:10]


# ---------------------------------------------------------------- measuring
def plot_payload(frames: list) -> tuple[int, int]:
    """(rows, JSON bytes) of the plot values as Gradio sends them."""
    rows = size = 0
    for frame, y in zip(frames, ("loss", "d", "lr")):
        if frame is None:
            continue
        rows += len(frame)
        data = gr.LinePlot(x="step", y=y, color="series").postprocess(frame)
        size += len(json.dumps(data.model_dump()))
    return rows, size


def timed(fn, *args) -> tuple[float, list]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def refresh_figures(run_dir: Path, refresh, repeats: int = 5) -> dict:
    first, result = timed(refresh, run_dir)
    rows, size = plot_payload(result[2:5])
    times = []
    for _ in range(repeats):
        append_steps(run_dir, 100)
        times.append(timed(refresh, run_dir)[0])
    return {"first": first, "next": statistics.median(times), "rows": rows, "bytes": size}


# ---------------------------------------------------------------- served: pages opened and closed
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def serve(code_dir: Path, runs_dir: Path, port: int) -> subprocess.Popen:
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from launch import LaunchSettings, launch;"
        "launch(LaunchSettings(port=int(sys.argv[2]), runs_dir=sys.argv[3]), block=False);"
        "time.sleep(3600)"
    )
    return subprocess.Popen(
        [sys.executable, "-c", script, str(code_dir), str(port), str(runs_dir)],
        cwd=code_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def pages_rss_growth(code_dir: Path, runs_dir: Path, pages: int) -> tuple[float, float]:
    """(RSS growth in MB after `pages` pages drew the run and closed, seconds per page)."""
    from gradio_client import Client

    port = free_port()
    server = serve(code_dir, runs_dir, port)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                Client(url, verbose=False, analytics_enabled=False).close()
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the UI in {code_dir} did not start") from None
                time.sleep(0.5)
        open_and_close_page(url)  # warm up: imports, caches and the run's history are not per page
        time.sleep(5)
        before = rss_mb(server.pid)
        start = time.perf_counter()
        for _ in range(pages):
            open_and_close_page(url)
        per_page = (time.perf_counter() - start) / pages
        time.sleep(5)  # unload handlers run after the heartbeat ends
        return rss_mb(server.pid) - before, per_page
    finally:
        server.terminate()
        server.wait(30)


def open_and_close_page(url: str) -> None:
    """A page opens, draws the Run tab once (the page-load event) and closes (its heartbeat ends)."""
    from gradio_client import Client

    client = Client(url, verbose=False, analytics_enabled=False)
    load = next(d for d in client.config["dependencies"] if "load" in [event for _, event in d["targets"]])
    client.predict(api_name=f"/{load['api_name']}")
    client.close()


def checkout(ref: str, into: Path) -> Path:
    """The repository at `ref`, as files (git archive), for serving the old UI."""
    archive = into / "before.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), ref], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "before", filter="data")
    return into / "before"


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--before-pages", type=int, help="pages for the old path (default --pages): slow")
    parser.add_argument("--before-ref", default=BEFORE_REF)
    parser.add_argument("--no-serve", action="store_true", help="skip the served RSS measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ppsf-ui-bench-") as tmp:
        tmp_path = Path(tmp)
        figures = {}
        for name, refresh in (("before", before_refresh), ("after", after_refresh)):
            run_dir = tmp_path / name / "runs" / "long-run"
            write_run(run_dir, args.steps)
            megabytes = (run_dir / EVENTS_FILE).stat().st_size / 1e6
            figures[name] = refresh_figures(run_dir, refresh)
            if not args.no_serve:
                code = REPO if name == "after" else checkout(args.before_ref, tmp_path)
                write_run(run_dir, args.steps)  # as written, without the appended steps
                pages = args.pages if name == "after" else args.before_pages or args.pages
                figures[name]["pages"] = pages
                figures[name]["rss"], figures[name]["page"] = pages_rss_growth(code, run_dir.parent, pages)
            print(name, figures[name], flush=True)
        print(
            f"\nRun tab refresh, {args.steps:,} steps ({megabytes:.1f} MB events.jsonl), log tail {LOG_LINES} lines"
        )
        print(
            "| path | first refresh | next refresh (+100 steps) | plot points | plot data | server RSS after pages |"
        )
        print("|---|---|---|---|---|---|")
        for name, label in (
            ("before", "before: read_events + whole-list frames"),
            ("after", "after: EventTail + RunHistory"),
        ):
            f = figures[name]
            rss = "not measured"
            if "rss" in f:
                per_page = f"{f['rss'] / f['pages']:.1f} MB, {f['page']:.1f} s per page"
                rss = f"+{f['rss']:.0f} MB after {f['pages']} ({per_page})"
            print(
                f"| {label} | {f['first']:.3f} s | {f['next']:.4f} s | {f['rows']:,} | {f['bytes'] / 1e6:.2f} MB | {rss} |"
            )


if __name__ == "__main__":
    main()
