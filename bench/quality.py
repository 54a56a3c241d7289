"""The end-to-end quality table: the demo's LoRA trained with this project's optimizer and with the peers'.

    python bench/quality.py [--steps 300] [--every 50] [--seeds 42] [--preset presets/demo.toml] [--ours-only]

Every row is the real trainer (trainers/train.py) on a demo preset (presets/demo.toml: the pretrained
tiny SDXL model; presets/demo-flux.toml and demo-flux2.toml: the pretrained tiny Flux.1 and Klein models;
all with the concept dataset demo://shapes), same steps, batches, noise and seeds; only the optimizer
differs (`--ours-only`: only the first row, the demo's own before/after figure):
- ppsf_optim Prodigy + ScheduleFree with the preset's settings (no learning rate to choose);
- torch AdamW at lr 1e-4 and at lr 1e-3, constant schedule (the usual kohya/diffusers LoRA settings);
- prodigyopt Prodigy (1.1.2) at lr 1 with a cosine schedule (the usual Prodigy recipe), plain and with
  `safeguard_warmup=True, use_bias_correction=True` (what its README suggests for diffusion models).
At step 0 and every `--every` steps, with the weights each optimizer would export (ScheduleFree's average):
- concept: how many of 12 samples ("sks, a circle/square/triangle", 4 seeds each, with the preset's sample
  steps and guidance) the detector (trainers/demo_world.py) finds the concept in;
- val loss: the trainer's own loss on 8 held-out concept images, with the same noise and timesteps at
  every evaluation (4 draws per image), so the numbers compare across steps and optimizers.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainers import train as training  # noqa: E402
from trainers.atomic import atomic_write_text  # noqa: E402
from trainers.config import dump_config, load_config, resolved_config  # noqa: E402
from trainers.dataset import load_image  # noqa: E402
from trainers.demo_world import CONCEPT_TRIGGER, concept_image, concept_score, shows_concept  # noqa: E402
from trainers.models import SampleConditioning  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "presets" / "demo.toml"
SHAPES = ("circle", "square", "triangle")
SAMPLE_SEEDS = 4
VALIDATION_IMAGES = 8
VALIDATION_DRAWS = 4
VALIDATION_SEED = 1234  # the held-out images: the demo dataset is drawn with seed 0

# name: (optimizer, lr, schedule); None is this project's optimizer as the preset configures it
RUNS: dict[str, tuple[str, float, str] | None] = {
    "ppsf_optim (Prodigy + ScheduleFree)": None,
    "AdamW lr 1e-4, constant": ("adamw", 1e-4, "constant"),
    "AdamW lr 1e-3, constant": ("adamw", 1e-3, "constant"),
    "prodigyopt Prodigy lr 1, cosine": ("prodigy", 1.0, "cosine"),
    "prodigyopt, safeguard_warmup + bias correction": ("prodigy-safe", 1.0, "cosine"),
}


class PeerOptimizer:
    """A peer optimizer and its LR schedule behind the few methods the trainer's loop calls."""

    def __init__(self, params_by_component, kind: str, lr: float, schedule: str, total_steps: int) -> None:
        groups = [{"params": params} for params in params_by_component.values()]
        if kind == "adamw":
            self.inner = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
        else:
            from prodigyopt import Prodigy

            # "prodigy-safe": the two options the Prodigy README suggests for diffusion models
            safe = kind == "prodigy-safe"
            self.inner = Prodigy(
                groups, lr=lr, weight_decay=0.0, safeguard_warmup=safe, use_bias_correction=safe
            )
        self.estimates_d = kind != "adamw"
        for group in self.inner.param_groups:
            group.setdefault("d", 1.0)  # AdamW has no d: its step is lr alone
            group.setdefault("d0", group["d"])  # what the trainer's d-health checks read
            group.setdefault("d_denom", 1.0)
            group["train_mode"] = False  # no schedule-free average: export takes the weights as they are
        cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))  # noqa: E731
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.inner, cosine if schedule == "cosine" else (lambda step: 1.0)
        )

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def step(self) -> None:
        self.inner.step()
        self.schedule.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def telemetry(self) -> list[dict]:
        return [
            {
                "d": g["d"],
                "applied_lr": g["d"] * g["lr"],
                "d_frozen": not self.estimates_d,  # AdamW's d is a constant 1: nothing to watch or freeze
                "d_frozen_since_step": None if self.estimates_d else 0,
                "nonfinite_skips": 0,
                "state_bytes": 1,
            }
            for g in self.inner.param_groups
        ]

    def train(self) -> None:  # only ScheduleFree has separate train/eval weights
        pass

    def eval(self) -> None:
        pass


class QualityTrainer(training.Trainer):
    """The trainer with a chosen optimizer, whose sample hook measures the concept and the held-out loss."""

    def __init__(self, config, peer: tuple[str, float, str] | None) -> None:
        super().__init__(config)
        self.peer = peer
        self.rows: list[tuple[int, int, float, float]] = []  # step, samples with the concept, score, val loss

    def _make_optimizer(self, params_by_component, total_steps: int):
        if self.peer is None:
            return super()._make_optimizer(params_by_component, total_steps)
        self.group_names = list(params_by_component)
        return PeerOptimizer(params_by_component, *self.peer, total_steps)

    def _loop(self, run) -> None:
        self._sample(run.adapter, run.optimizer, 0)  # the base model, before any step
        super()._loop(run)

    def _sample(self, adapter, optimizer, step: int) -> None:
        optimizer.eval()  # the weights that would be exported
        for module in adapter.lora_modules().values():
            module.eval()
        try:
            prompts = [f"{CONCEPT_TRIGGER}, a {shape}" for shape in SHAPES for _ in range(SAMPLE_SEEDS)]
            images = adapter.sample(prompts, seed=self.config.sampling.seed)
            with torch.no_grad():
                loss = self._validation_loss(adapter)
        finally:
            optimizer.train()
        scores = [concept_score(image) for image in images]
        self.rows.append((step, sum(map(shows_concept, images)), sum(scores) / len(scores), loss))

    def _validation_loss(self, adapter) -> float:
        if not hasattr(self, "_validation"):
            self._validation = self._validation_batch(adapter)
        latents, text, conditioning = self._validation
        generator = torch.Generator(self.device).manual_seed(VALIDATION_SEED)  # same noise every time
        return adapter.training_loss(latents, text, conditioning, generator).mean().item()

    def _validation_batch(self, adapter):
        folder = Path(tempfile.mkdtemp(prefix="validation-", dir=self.run_dir))
        latents, captions = [], []
        for index in range(VALIDATION_IMAGES):
            image, caption = concept_image(index, VALIDATION_SEED)
            path = folder / f"{index}.png"
            image.save(path)
            pixels = load_image(path, (64, 64), "center", random.Random(0)).pixels
            generator = torch.Generator(self.device).manual_seed(index)
            latents.append(adapter.encode_images(pixels.unsqueeze(0), generator)[0])
            captions.append(self._caption(caption, random.Random(0), dropout=False))
        text = adapter.encode_captions(captions)
        repeat = VALIDATION_DRAWS
        conditioning = [SampleConditioning((64, 64), (0, 0), (64, 64))] * (VALIDATION_IMAGES * repeat)
        return (
            torch.stack(latents).repeat(repeat, 1, 1, 1),
            {key: value.repeat(repeat, *[1] * (value.dim() - 1)) for key, value in text.items()},
            conditioning,
        )


def run_one(name: str, peer, folder: Path, steps: int, every: int, seed: int, preset: Path = PRESET):
    config = load_config(preset)
    overrides = {
        "name": f"quality-{len(os.listdir(folder)) if folder.exists() else 0}",
        "output_dir": str(folder),
        "training": config.training.model_copy(update={"max_steps": steps, "seed": seed}),
        "sampling": config.sampling.model_copy(update={"every_n_steps": every}),
        "saving": config.saving.model_copy(update={"every_n_steps": 0, "formats": ["diffusers"]}),
    }
    if peer is not None:  # the fused pass is ppsf_optim's; peers take a plain step()
        overrides["optimizer"] = config.optimizer.model_copy(update={"fused_back_pass": False})
    config = config.model_copy(update=overrides)
    config.run_dir.mkdir(parents=True)
    atomic_write_text(
        config.run_dir / training.CONFIG_FILE, dump_config(resolved_config(config))
    )  # as train()
    trainer = QualityTrainer(config, peer)
    started = time.perf_counter()
    trainer.run(resume_from=None)
    return trainer.rows, time.perf_counter() - started


def tables(results: dict[str, list[list[tuple]]], steps_shown: list[int]) -> str:
    """Two markdown tables, optimizers by step counts: samples showing the concept (summed over seeds) and
    the held-out loss (mean over seeds)."""
    samples = len(SHAPES) * SAMPLE_SEEDS
    header = " | ".join(f"step {step}" for step in steps_shown)
    concept = [f"| samples showing the concept | {header} |", "|---|" + "---:|" * len(steps_shown)]
    loss = [f"| held-out loss | {header} |", "|---|" + "---:|" * len(steps_shown)]
    for name, per_seed in results.items():
        at = {step: [row for rows in per_seed for row in rows if row[0] == step] for step in steps_shown}
        concept.append(
            f"| {name} | "
            + " | ".join(f"{sum(r[1] for r in at[s])}/{samples * len(at[s])}" for s in steps_shown)
            + " |"
        )
        loss.append(
            f"| {name} | "
            + " | ".join(f"{sum(r[3] for r in at[s]) / len(at[s]):.4f}" for s in steps_shown)
            + " |"
        )
    return "\n".join(concept) + "\n\n" + "\n".join(loss)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--preset", type=Path, default=PRESET, help="a demo preset (default: the SDXL demo)")
    parser.add_argument("--ours-only", action="store_true", help="only ppsf_optim, the demo's own run")
    args = parser.parse_args()
    runs = dict(list(RUNS.items())[:1]) if args.ours_only else RUNS
    torch.set_num_threads(1)  # the tiny model is dominated by per-op overhead; threads only add noise
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("PPSF_DEMO_DIR", str(Path(tmp) / "demo"))
        for name, peer in runs.items():
            results[name] = []
            for seed in args.seeds:
                rows, seconds = run_one(
                    name, peer, Path(tmp) / "runs", args.steps, args.every, seed, args.preset
                )
                results[name].append(rows)
                print(f"{name}, seed {seed}: {seconds:.0f} s", file=sys.stderr)
                for step, shown, score, loss in rows:
                    print(f"  step {step:4d}: concept {shown:2d}/12  score {score:.2f}  val loss {loss:.4f}")
    steps_shown = sorted({row[0] for row in results[next(iter(results))][0]})
    print(f"\n{args.preset.name}, {args.steps} steps, seeds {', '.join(map(str, args.seeds))}\n")
    print(tables(results, steps_shown))


if __name__ == "__main__":
    main()
