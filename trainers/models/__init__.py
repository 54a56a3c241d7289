"""One adapter per model family; the training loop only talks to `ModelAdapter`.

Importing this package imports no torch: `check` reads the families' pre-load knowledge
(trainers/models/families.py) through it; `ModelAdapter` and `SampleConditioning` (base.py, torch) are
imported when first asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainers.models.families import family_for

if TYPE_CHECKING:
    from trainers.models.base import ModelAdapter, SampleConditioning


def __getattr__(name: str) -> Any:
    if name in ("ModelAdapter", "SampleConditioning"):
        from trainers.models import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def adapter_for(family: str) -> type[ModelAdapter]:
    """The adapter class of a model family named in the config."""
    if family == "sdxl":
        from trainers.models.sdxl import SDXLAdapter

        return SDXLAdapter
    if family == "flux":
        from trainers.models.flux import FluxAdapter

        return FluxAdapter
    if family == "flux2":
        from trainers.models.flux2 import Flux2Adapter

        return Flux2Adapter
    raise ValueError(f"model.family: unknown family {family!r}; supported: sdxl, flux, flux2")


def memory_model_for(family: str) -> type:
    """The class that builds a family's architecture on the meta device for the memory estimate."""
    module, name = family_for(family).memory_model
    return getattr(importlib.import_module(module), name)


def transformer_target_modules(family: str, options) -> str | list[str]:
    """PEFT target_modules of a Flux family's transformer for `options` (a FluxTrainingOptions), without
    loading the model (export writes them into lora_adapter_metadata)."""
    if family == "flux":
        from trainers.models.flux import TARGET_SETS
    elif family == "flux2":
        from trainers.models.flux2 import TARGET_SETS
    else:
        raise ValueError(f"model.family: {family!r} has no Flux target sets")
    targets = options.lora_targets
    return targets if isinstance(targets, list) else TARGET_SETS[targets]


__all__ = [
    "ModelAdapter",
    "SampleConditioning",
    "adapter_for",
    "memory_model_for",
    "transformer_target_modules",
]
