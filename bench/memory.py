"""The memory estimate against what real training runs hold, on the CPU, plus the real-size SDXL presets.

    HF_HUB_OFFLINE=1 python bench/memory.py            # tiny runs and the presets
    HF_HUB_OFFLINE=1 python bench/memory.py --tiny     # tiny runs only
    HF_HUB_OFFLINE=1 python bench/memory.py --write-bundled  # remeasure trainers/memory/bundled_measurements.json

Measurement (the same for every run): the real trainer (`trainers.train.Trainer`) runs a few steps on the
CPU under `trainers.memory.measure.LiveTensors`, which counts the bytes of every tensor storage alive,
once per storage, from its creation to the moment Python frees it; the loaded model weights are added
right after loading (safetensors creates them outside torch's dispatcher). The peak is taken per phase of
the trainer: loading and caching (until `offload_encoders`), training steps, and sampling; checkpoint
saving (host copies, not device memory on a GPU) is left out. tests/test_memory.py checks this count
against the CPU allocator's own records (torch.profiler), within 5%.

On a CPU nothing moves between devices, so the estimate compared is `estimate(config, device_type="cpu")`,
in which every component counts in every phase and no CUDA allowances are added. The real-GPU comparison
(torch.cuda.max_memory_allocated on real-size models) has not been run yet: no GPU was available.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trainers.config import load_config, validate_config  # noqa: E402
from trainers.memory import estimate  # noqa: E402
from trainers.memory.estimate import GIB  # noqa: E402
from trainers.memory.measure import LiveTensors  # noqa: E402

PRESETS = Path(__file__).resolve().parent.parent / "presets"
MIB = 1 << 20

# A larger tiny SDXL (still CPU-sized) so that activations, not the optimizer's fixed 8 MiB of buffers,
# dominate: the tiny_models UNet widened to (32, 64) channels with two transformer layers.
SMALL_UNET = {"block_out_channels": (32, 64), "norm_num_groups": 8, "transformer_layers_per_block": (2, 2)}


def build_small_sdxl(folder: Path) -> Path:
    from diffusers import UNet2DConditionModel

    from trainers.tiny_models import UNET_CONFIG, make_tiny_sdxl_pipeline

    if (folder / "model_index.json").is_file():
        return folder
    pipe = make_tiny_sdxl_pipeline(seed=0)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(**{**UNET_CONFIG, **SMALL_UNET}).eval()
    pipe.register_modules(unet=pipe.unet)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


class PhasePeaks:
    """Peaks of `tracker` between the trainer's phase boundaries (installed by patching the trainer)."""

    def __init__(self, tracker: LiveTensors) -> None:
        self.tracker = tracker
        self.phase = "load and fill caches"
        self.peaks: dict[str, int] = {}

    def enter(self, phase: str) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.tracker.peak)
        self.tracker.reset_peak()
        self.phase = phase


def measure_run(config) -> dict[str, int]:
    """Per-phase peak live tensor bytes of a real (CPU) run of `config`."""
    from trainers import train as training
    from trainers.models import sdxl

    tracker = LiveTensors()
    phases = PhasePeaks(tracker)
    originals = {
        "load": sdxl.SDXLAdapter.load,
        "offload": sdxl.SDXLAdapter.offload_encoders,
        "checkpoint": training.Trainer._checkpoint,
        "sample": training.Trainer._sample,
    }

    def load(self):
        originals["load"](self)
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2):
            for tensor in [*module.parameters(), *module.buffers()]:
                tracker.add(tensor)

    def offload(self):
        if phases.phase == "load and fill caches":
            phases.enter("training")
        originals["offload"](self)

    def around(name, original):
        def run(self, *args, **kwargs):
            previous = phases.phase
            phases.enter(name)
            try:
                return original(self, *args, **kwargs)
            finally:
                phases.enter(previous)

        return run

    sdxl.SDXLAdapter.load = load
    sdxl.SDXLAdapter.offload_encoders = offload
    training.Trainer._checkpoint = around("checkpoint", originals["checkpoint"])
    training.Trainer._sample = around("sampling", originals["sample"])
    try:
        with tracker:
            training.train(config)
        phases.enter("done")
    finally:
        sdxl.SDXLAdapter.load = originals["load"]
        sdxl.SDXLAdapter.offload_encoders = originals["offload"]
        training.Trainer._checkpoint = originals["checkpoint"]
        training.Trainer._sample = originals["sample"]
    return {name: peak for name, peak in phases.peaks.items() if name not in ("checkpoint", "done")}


def tiny_cases(root: Path) -> list[tuple[str, dict]]:
    small = str(build_small_sdxl(root / "small-sdxl"))
    base = {
        "output_dir": str(root / "runs"),
        # upscaled to the bucket, so every step trains at `resolution` (the estimate's assumption: with
        # no_upscale, smaller images train smaller and the estimate is an upper bound)
        "dataset": {"path": "demo://shapes", "resolution": 64, "no_upscale": False},
        "lora": {"rank": 8},
        "training": {"max_steps": 2, "batch_size": 2, "precision": "fp32"},
        "sampling": {"prompts": ["a red circle"], "steps": 2, "guidance": 4.0},
        "saving": {"every_n_steps": 0},
    }
    cases = [
        ("demo model, 64 px, batch 2", {"model": {"path": "demo://tiny-sdxl"}}),
        ("small model, 256 px, batch 2", {"model": {"path": small}, "dataset": {"resolution": 256}}),
        (
            "small, 256 px, batch 4, checkpointing",
            {
                "model": {"path": small},
                "dataset": {"resolution": 256},
                "training": {"batch_size": 4, "gradient_checkpointing": True},
            },
        ),
        (
            "small, 256 px, no caches, step()",
            {
                "model": {"path": small},
                "dataset": {"resolution": 256, "cache_latents": False, "shuffle_tags": True},
                "optimizer": {"fused_back_pass": False},
            },
        ),
        (
            "small, 256 px, bf16 autocast",
            {"model": {"path": small}, "dataset": {"resolution": 256}, "training": {"precision": "bf16"}},
        ),
    ]
    configs = []
    for index, (name, changes) in enumerate(cases):
        data = {key: dict(value) for key, value in base.items() if isinstance(value, dict)}
        data["output_dir"] = base["output_dir"]
        for section, values in changes.items():
            data[section] = {**data.get(section, {}), **values}
        data["name"] = f"bench-{index}"
        configs.append((name, data))
    return configs


def clear_caches(config) -> None:
    from trainers.paths import resolve_dataset_path

    shutil.rmtree(resolve_dataset_path(config.dataset.path) / ".ppsf-cache", ignore_errors=True)


def tiny_table() -> list[str]:
    rows = ["| run | phase | estimate | measured | estimate / measured |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        os.environ.setdefault("PPSF_DEMO_DIR", str(root / "demo"))
        os.environ.setdefault("PPSF_MEMORY_CACHE", str(root / "memory-cache"))
        for name, data in tiny_cases(root):
            config = validate_config(data)
            clear_caches(config)  # every run fills its caches, as the estimate assumes
            predicted = {phase.name: phase.total for phase in estimate(config, device_type="cpu").phases}
            measured = measure_run(config)
            for phase, real in measured.items():
                guess = predicted.get(phase, 0)
                rows.append(
                    f"| {name} | {phase} | {guess / MIB:.2f} MiB | {real / MIB:.2f} MiB | {guess / real:.3f} |"
                )
            peak_guess, peak_real = max(predicted.values()), max(measured.values())
            rows.append(
                f"| {name} | **peak** | {peak_guess / MIB:.2f} MiB | {peak_real / MIB:.2f} MiB | "
                f"**{peak_guess / peak_real:.3f}** |"
            )
            print(rows[-1], flush=True)
    return rows


def preset_table() -> list[str]:
    rows = [
        "| preset | card | load + caches | training | sampling | peak + allowances | fits |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in sorted(PRESETS.glob("sdxl_*.toml")):
        est = estimate(load_config(path))
        phases = {phase.name: phase.total / GIB for phase in est.phases}
        card = int(path.stem.split("_")[1].removesuffix("gb"))
        sampling = f"{phases['sampling']:.2f} GiB" if "sampling" in phases else "no samples"
        rows.append(
            f"| {path.name} | {card} GB | {phases['load and fill caches']:.2f} GiB | {phases['training']:.2f} GiB | "
            f"{sampling} | {est.total / GIB:.2f} GiB | "
            f"{'yes' if est.fits(card * GIB) else 'no'} |"
        )
        print(rows[-1], flush=True)
    return rows


def bundled_entries(presets: list[Path], device_type: str = "cuda") -> list[dict]:
    """Fresh measurements (no cache consulted) of everything `estimate` needs for `presets` on a
    `device_type` card, as the entries of trainers/memory/bundled_measurements.json."""
    from trainers.memory.estimate import architecture_of, measure, measurement_keys

    entries: dict[str, dict] = {}
    for path in presets:
        config = load_config(path)
        architecture = architecture_of(config)
        for key in measurement_keys(config, device_type, architecture[0]):
            if key not in entries:
                entries[key] = measure(key, architecture)
                print(f"{path.name}: measured {json.loads(key)['kind']}", flush=True)
    return [{"key": key, "result": result} for key, result in sorted(entries.items())]


def write_bundled() -> None:
    from trainers.atomic import atomic_write_text
    from trainers.memory.estimate import BUNDLED_MEASUREMENTS

    presets = sorted(PRESETS.glob("sdxl_*.toml"))
    document = {
        "about": "Meta-device measurements of the bundled SDXL configs at the settings of "
        + ", ".join(p.name for p in presets)
        + ", on a CUDA card: `python -m trainers check` uses them instead of measuring again. "
        "Regenerate with `HF_HUB_OFFLINE=1 python bench/memory.py --write-bundled` when tests/test_memory.py "
        "says they are stale.",
        "entries": bundled_entries(presets),
    }
    atomic_write_text(BUNDLED_MEASUREMENTS, json.dumps(document, indent=1) + "\n")
    print(f"wrote {BUNDLED_MEASUREMENTS} ({len(document['entries'])} measurements)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="only the tiny CPU runs")
    parser.add_argument(
        "--write-bundled", action="store_true", help="remeasure the presets' bundled measurements"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.write_bundled:
        write_bundled()
        return
    print("\n".join(tiny_table()))
    if not args.tiny:
        print()
        print("\n".join(preset_table()))


if __name__ == "__main__":
    main()
