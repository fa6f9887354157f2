"""The KV shapes the transfer benchmarks move: (layers, KV heads, head dim) per model, bf16."""

from __future__ import annotations

import argparse

KV_SHAPES: dict[str, tuple[int, int, int]] = {
    "qwen2-1.5b": (28, 2, 128),
    "llama-3.1-8b": (32, 8, 128),
    "llama-3.1-70b-tp8": (80, 1, 128),  # one rank of Llama-3.1-70B at TP=8: its 8 KV heads split 8 ways
}
CHUNK = 256


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(KV_SHAPES), default="qwen2-1.5b", help="KV shape")
    parser.add_argument("--tokens-per-block", type=int, choices=(32, 64), default=32)


def row_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    """One pool row of TRT-LLM's layout: ``[layers, 2 (K, V), kv_heads * tokens_per_block * head_dim]``."""
    layers, kv_heads, head_dim = KV_SHAPES[args.model]
    return layers, 2, kv_heads * args.tokens_per_block * head_dim
