"""One adapter per model family; the training loop only talks to `ModelAdapter`."""

from __future__ import annotations

from trainers.models.base import ModelAdapter, SampleConditioning


def adapter_for(family: str) -> type[ModelAdapter]:
    """The adapter class of a model family named in the config."""
    if family == "sdxl":
        from trainers.models.sdxl import SDXLAdapter

        return SDXLAdapter
    raise ValueError(f"model.family: unknown family {family!r}; supported: sdxl")


def memory_model_for(family: str) -> type:
    """The class that builds a family's architecture on the meta device for the memory estimate."""
    if family == "sdxl":
        from trainers.models.sdxl_memory import SDXLMemoryModel

        return SDXLMemoryModel
    raise ValueError(f"model.family: no memory estimate for {family!r}; supported: sdxl")


__all__ = ["ModelAdapter", "SampleConditioning", "adapter_for", "memory_model_for"]
