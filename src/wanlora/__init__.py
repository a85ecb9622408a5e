"""wanlora: LoRA fine-tuning for the Wan2.2 and Wan2.1 video diffusion models."""

__version__ = "0.1.0"
