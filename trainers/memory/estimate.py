"""The memory a training run needs on its device, phase by phase, in the order trainers/train.py runs them.

1. load and fill caches: the adapter puts the VAE and text encoders on the device (the denoiser stays on
   the CPU), encodes whatever the latent and text caches miss;
2. train: `offload_encoders()` moves them off and the denoiser on; encoders come back only when they train
   or when a step must encode (latents or captions not cached); LoRA weights, optimizer state, gradients
   (the fused backward pass steps and frees them in 16 MiB buckets) and the step's activations;
3. sample (when prompts are set): the prompts were encoded in phase 1 (`prepare_samples`), so only the VAE
   joins the denoiser (and the text encoders only when they train: they re-encode with their current
   weights), then leaves.

The peak is the largest phase, not the sum. Activations and workspaces are measured by running the family's
real architecture on the meta device (trainers/memory/measure.py); weights and optimizer state are counted.
On a CPU run nothing moves, so every component counts in every phase.

Measuring takes seconds to a minute, so each measurement is kept under a key of exactly what it depends on
(`measurement_keys`): found in memory, then in the bundled file (the SDXL presets' settings, shipped in the
repo), then in the disk cache; a warm estimate reads json files and imports no model library, nor torch
(measuring imports them: trainers/memory/measurements.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from trainers.atomic import atomic_write_text
from trainers.config import TrainConfig
from trainers.memory.family import Component
from trainers.memory.optimizer_state import FUSED_BUCKET_BYTES
from trainers.models.families import Architecture, family_for

# Allowances for what a live-tensor count cannot see; stated, not measured (no GPU has checked them yet).
CUDA_CONTEXT_BYTES = 512 << 20  # CUDA context, cuBLAS/cuDNN handles and workspaces (typically 0.3-0.6 GiB)
ALLOCATOR_FRACTION = 0.10  # the caching allocator's rounding and fragmentation above the live peak

GIB = 1 << 30


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    detail: str = ""


@dataclass(frozen=True)
class Phase:
    name: str
    parts: tuple[Part, ...]

    @property
    def total(self) -> int:
        return sum(part.bytes for part in self.parts)


@dataclass(frozen=True)
class MemoryEstimate:
    device_type: str
    architecture: str
    phases: tuple[Phase, ...]

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda phase: phase.total)

    @property
    def measured_peak(self) -> int:
        """The largest phase: live tensor bytes, as torch.cuda.max_memory_allocated would count them."""
        return self.peak_phase.total

    @property
    def allowances(self) -> tuple[Part, ...]:
        if self.device_type != "cuda":
            return ()
        return (
            Part("CUDA context (allowance)", CUDA_CONTEXT_BYTES, "stated constant, not measured"),
            Part(
                "allocator reserve (allowance)",
                int(self.measured_peak * ALLOCATOR_FRACTION),
                f"{ALLOCATOR_FRACTION:.0%} of the peak, stated, not measured",
            ),
        )

    @property
    def total(self) -> int:
        """What the card needs: the peak phase plus the allowances."""
        return self.measured_peak + sum(part.bytes for part in self.allowances)

    def fits(self, card_bytes: int) -> bool:
        return self.total <= card_bytes


def estimate(config: TrainConfig, device_type: str = "cuda") -> MemoryEstimate:
    """The peak memory of `config`'s run on a `device_type` ("cuda" or "cpu") device, phase by phase."""
    architecture = architecture_of(config)
    measured = {**_measure(config, device_type, architecture), "architecture": architecture[1]}
    return _compose(config, device_type, measured)


# ------------------------------------------------------------------ measurements and their caches
def architecture_of(config: TrainConfig) -> Architecture:
    """The family's component configs for `model.path` (read from small json files, no weights)."""
    return family_for(config.model.family).estimate_architecture(config)


def _measure(config: TrainConfig, device_type: str, architecture: Architecture) -> dict[str, int | list]:
    """All measurements `config` needs: from memory, the bundled file, the disk cache, else measured."""
    measured: dict[str, int | list] = {}
    for key in measurement_keys(config, device_type, architecture[0]):
        measured.update(_cached(key, architecture))
    return measured


def measurement_keys(config: TrainConfig, device_type: str, configs: dict[str, dict]) -> list[str]:
    """The cache keys of the measurements `config` needs: exactly what each measurement depends on (the
    architecture's digest, not the model's path; the config fields it reads; the measuring code and
    library versions), as canonical JSON text."""
    base = {"family": config.model.family, "architecture": architecture_digest(configs)}
    base["precision"] = config.training.precision
    base["flux"] = config.flux.model_dump(mode="json")  # variant, targets, quantisation (defaults for SDXL)
    encoding = {**base, "resolution": config.dataset.resolution}
    keys = [
        ("encoding", encoding),
        (
            "training",
            {
                **encoding,
                "lora": config.lora.model_dump(mode="json"),
                "optimizer": config.optimizer.model_dump(mode="json"),
                "text_each_step": not _text_cached(config),
                "batch": config.training.batch_size,
                "checkpointing": config.training.gradient_checkpointing,
            },
        ),
    ]
    if config.sampling.prompts:
        height, width = _sample_size(config)
        keys.append(("sampling", {**base, "height": height, "width": width}))
    code = code_version(config.model.family)
    return [
        json.dumps({"kind": kind, "device": device_type, "key": key, "code": code}, sort_keys=True)
        for kind, key in keys
    ]


def architecture_digest(configs: dict[str, dict]) -> str:
    """The components' configs, less the fields that only record where and by what they were saved
    (`_name_or_path`, `_diffusers_version`, `transformers_version`, ...): a downloaded model's configs
    and the bundled copies of the same architecture give the same digest."""
    shape = {
        part: {k: v for k, v in values.items() if not k.startswith("_") and k != "transformers_version"}
        for part, values in configs.items()
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def _cached(key: str, architecture: Architecture) -> dict:
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    result = bundled_measurements().get(key)
    path = cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if result is None:
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            result = stored["result"] if stored.get("key") == key else None
        except (OSError, ValueError, KeyError):
            result = None
    if result is None:
        result = measure(key, architecture)
        with contextlib.suppress(OSError):  # a read-only home only costs the next run the measurement
            atomic_write_text(path, json.dumps({"key": key, "result": result}))
    _MEMORY_CACHE[key] = result
    return result


_MEMORY_CACHE: dict[str, dict] = {}


def measure(key: str, architecture: Architecture) -> dict:
    """The measurement `key` names, made now (no cache consulted); seconds to a minute."""
    from trainers.memory.measurements import MEASUREMENTS, config_for_measuring

    spec = json.loads(key)
    if spec["key"]["architecture"] != architecture_digest(architecture[0]):
        raise ValueError("the architecture given is not the one the key names")
    return MEASUREMENTS[spec["kind"]](config_for_measuring(spec["key"]), spec["device"], architecture)


def cache_dir() -> Path:
    """Where measurements are kept between runs (PPSF_MEMORY_CACHE, else ~/.cache/ppsf-trainer/memory)."""
    default = Path.home() / ".cache" / "ppsf-trainer" / "memory"
    return Path(os.environ.get("PPSF_MEMORY_CACHE", default))


BUNDLED_MEASUREMENTS = Path(__file__).parent / "bundled_measurements.json"


@functools.cache
def bundled_measurements() -> dict[str, dict]:
    """Measurements shipped with the repo (the SDXL presets' settings), by key; written by
    `python bench/memory.py --write-bundled`, checked against fresh ones by tests/test_memory.py."""
    try:
        entries = json.loads(BUNDLED_MEASUREMENTS.read_text(encoding="utf-8"))["entries"]
    except (OSError, ValueError, KeyError):
        return {}
    return {entry["key"]: entry["result"] for entry in entries}


# What a measurement runs: the measuring code, the family's memory model, the optimizer whose state is
# counted, and the libraries that run the architecture. The composition (this file, report.py) is not part.
_MEASURING_CODE = ("family.py", "measure.py", "measurements.py", "optimizer_state.py")
_LIBRARIES = ("torch", "diffusers", "transformers", "peft")


@functools.cache
def code_version(family: str) -> str:
    """Measurements are redone when the code that makes them or a library it runs changes (read from
    the files and the installed packages' metadata: nothing is imported)."""
    from importlib.metadata import version
    from importlib.util import find_spec

    here = Path(__file__).parent
    files = [here / name for name in _MEASURING_CODE]
    files.append(Path(find_spec(family_for(family).memory_model[0]).origin))
    files += sorted((here.parent.parent / "ppsf_optim").glob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for library in _LIBRARIES:  # a local build tag (+cu128, +cpu) does not change the meta-device passes
        digest.update(f"{library}=={version(library).split('+')[0]}".encode())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------ phases
def _compose(config: TrainConfig, device_type: str, measured: dict) -> MemoryEstimate:
    on_cpu = device_type == "cpu"  # nothing moves: every component is in the same memory throughout
    m = SimpleNamespace(**{"sample_step": 0, "decode": 0, **measured})
    components = [Component(**c) for c in m.components]
    by_role = {
        role: [c for c in components if c.role == role]
        for role in ("denoiser", "text_encoder", "image_encoder")
    }

    def weight_parts(roles: list[str]) -> list[Part]:
        return [
            Part(f"base weights: {c.name}", c.bytes, f"{c.precision}, {_count(c.params)} params")
            for role in roles
            for c in by_role[role]
        ]

    everything = ["denoiser", "text_encoder", "image_encoder"]
    resolution = config.dataset.resolution
    latents_cached = config.dataset.cache_latents and config.dataset.crop == "center"
    text_cached = _text_cached(config)

    # the sample prompts are encoded here too, before the denoiser comes on
    encodes_text = text_cached or bool(config.sampling.prompts)
    caching_work = max(m.encode_image if latents_cached else 0, m.encode_captions if encodes_text else 0)
    caching = Phase(
        "load and fill caches",
        (
            *weight_parts(everything if on_cpu else ["text_encoder", "image_encoder"]),
            Part(
                "workspace: encoding", caching_work, f"VAE encode at {resolution}x{resolution}, text encoders"
            ),
        ),
    )

    trained = _trained_parts(config, m)
    resident = ["denoiser"]
    if on_cpu or config.lora.train_text_encoder or not text_cached:
        resident.append("text_encoder")
    if on_cpu or not latents_cached:
        resident.append("image_encoder")
    step_work = max(m.step_peak - m.activations - m.gradients, 0)
    if not latents_cached:
        step_work = max(step_work, m.encode_image - m.activations - m.gradients)
    training = Phase(
        "training",
        (
            *weight_parts(resident),
            *trained,
            Part("gradients", m.gradients, _gradient_detail(config)),
            Part("activations kept for backward", m.activations, _activation_detail(config)),
            Part("backward workspace", step_work, "gradients of activations, recomputed blocks, attention"),
        ),
    )
    phases = [caching, training]
    if config.sampling.prompts:
        height, width = _sample_size(config)
        # prompts encoded before training: frozen text encoders stay off the device while sampling
        trained_text = config.lora.train_text_encoder
        sampling_roles = everything if on_cpu or trained_text else ["denoiser", "image_encoder"]
        detail = f"denoiser step with guidance and VAE decode at {width}x{height}"
        phases.append(
            Phase(
                "sampling",
                (
                    *weight_parts(sampling_roles),
                    *trained,
                    Part(
                        "workspace: sampling",
                        max(m.sample_step, m.decode, m.encode_captions if trained_text else 0),
                        detail
                        + (", prompts re-encoded by the trained text encoders" if trained_text else ""),
                    ),
                ),
            )
        )
    return MemoryEstimate(device_type=device_type, architecture=m.architecture, phases=tuple(phases))


def _trained_parts(config: TrainConfig, m: SimpleNamespace) -> tuple[Part, ...]:
    per_param = (m.optimizer_state + m.optimizer_buffers) / max(m.lora_params, 1)
    return (
        Part(
            "LoRA weights",
            m.lora_bytes,
            f"fp32, rank {config.lora.rank}, {_count(m.lora_params)} params",
        ),
        Part(
            "optimizer state (ppsf_optim)",
            m.optimizer_state + m.optimizer_buffers,
            f"{per_param:.1f} bytes/param incl. step buffers, while d adapts",
        ),
    )


def _gradient_detail(config: TrainConfig) -> str:
    if config.optimizer.fused_back_pass:
        return f"fused backward pass: only the current {FUSED_BUCKET_BYTES >> 20} MiB bucket is alive"
    return "all LoRA gradients until optimizer.step()"


def _activation_detail(config: TrainConfig) -> str:
    training = config.training
    size = config.dataset.resolution
    checkpointing = "on" if training.gradient_checkpointing else "off"
    return f"{size}x{size}, batch {training.batch_size}, {training.precision}, checkpointing {checkpointing}"


def _text_cached(config: TrainConfig) -> bool:
    """Whether the trainer caches text embeddings (train.py: only for fixed captions, frozen encoders)."""
    dataset = config.dataset
    return dataset.cache_text_embeddings and not dataset.shuffle_tags and not config.lora.train_text_encoder


def _sample_size(config: TrainConfig) -> tuple[int, int]:
    sampling = config.sampling
    return (sampling.height or config.dataset.resolution, sampling.width or config.dataset.resolution)


def _count(n: int) -> str:
    return f"{n / 1e6:,.1f} M" if n >= 100_000 else f"{n:,}"
