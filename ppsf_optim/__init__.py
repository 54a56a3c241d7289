"""Prodigy + ScheduleFree optimizer: drop-in for the public `prodigy-plus-schedule-free` package."""

from .optimizer import FusedBackward, ProdigyPlusScheduleFree

__all__ = ["FusedBackward", "ProdigyPlusScheduleFree"]
__version__ = "0.1.0"
