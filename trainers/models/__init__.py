"""One adapter per model family; the training loop only talks to `ModelAdapter`."""

from __future__ import annotations

from trainers.models.base import ModelAdapter, SampleConditioning


def adapter_for(family: str) -> type[ModelAdapter]:
    """The adapter class of a model family named in the config."""
    if family == "sdxl":
        from trainers.models.sdxl import SDXLAdapter

        return SDXLAdapter
    raise ValueError(f"model.family: unknown family {family!r}; supported: sdxl")


__all__ = ["ModelAdapter", "SampleConditioning", "adapter_for"]
