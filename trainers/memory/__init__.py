"""A model-aware memory estimate before a run starts (see estimate.py for how it is made)."""

from trainers.memory.estimate import MemoryEstimate, Part, Phase, estimate
from trainers.memory.report import estimate_summary, print_check, suggestions

__all__ = ["MemoryEstimate", "Part", "Phase", "estimate", "estimate_summary", "print_check", "suggestions"]
