"""KV cache layer for TensorRT-LLM."""

__version__ = "0.1.0"
"""The release; pyproject.toml reads it from here (the one place it is written)."""
