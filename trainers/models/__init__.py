"""One adapter per model family; the training loop only talks to `ModelAdapter`."""

from __future__ import annotations

from trainers.models.base import ModelAdapter, SampleConditioning


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


__all__ = ["ModelAdapter", "SampleConditioning", "adapter_for"]
