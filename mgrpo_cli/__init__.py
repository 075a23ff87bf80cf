"""mgrpo: Multi-layer GRPO (arXiv 2506.04746) for reasoning and self-correction, on Hydra + Lightning."""

__version__ = "0.1.0"
