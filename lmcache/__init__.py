"""KV cache layer for TensorRT-LLM."""
