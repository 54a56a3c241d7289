"""LoRA training for diffusion models with ppsf_optim: config, dataset, model adapters, loop, export."""

__version__ = "0.1.0"
