"""minidiff — Stable Diffusion v1.4 rebuilt from scratch in PyTorch, one readable module per concept."""
__version__ = "0.1.0"
