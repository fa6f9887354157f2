"""Shared helpers for the connector end-to-end tests over the executor replay."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import torch

from lmcache.integration.tensorrt_llm.tensorrt_adapter import process_engine, reset_process_engine
from lmcache.testing.trtllm_replay import (
    GenerationResult,
    KvCacheConfig,
    KvCacheConnectorConfig,
    ModelConfig,
    ReplayExecutor,
    TorchLlmArgs,
    llm_args_for,
)

if TYPE_CHECKING:
    from .presets import Preset

MODEL = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
TPB = 16
CHUNK = 64


@pytest.fixture
def lmcache_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The seed's way of configuring the in-process engine: LMCACHE_* variables, a fresh engine."""
    for key in list(os.environ):
        if key.startswith("LMCACHE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", str(CHUNK))
    monkeypatch.setenv("LMCACHE_LOCAL_CPU", "True")
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "0.05")
    reset_process_engine()
    yield monkeypatch
    reset_process_engine()


def llm_args(
    connector: str | None = "lmcache",
    *,
    tp: int = 1,
    max_tokens: int = 2048,
    chunk: int | None = None,
    server_url: str | None = None,
) -> TorchLlmArgs:
    return TorchLlmArgs(
        model="replay/qwen-like",
        tensor_parallel_size=tp,
        kv_cache_config=KvCacheConfig(tokens_per_block=TPB, max_tokens=max_tokens, enable_block_reuse=True),
        kv_connector_config=None
        if connector is None
        else KvCacheConnectorConfig(connector=connector, server_url=server_url),
        enable_chunked_prefill=chunk is not None,
        max_num_tokens=chunk or 8192,
    )


VSWA = dataclasses.replace(MODEL, num_layers=3, layer_windows=(64, None, 64))
"""Sliding-window layers around a full-attention one: two layer groups under V2."""
SLIDING = dataclasses.replace(MODEL, layer_windows=(64, 64))
"""Every layer sliding: nothing a finished request leaves on the device is reused."""


def mode_args(
    preset: Preset | None,
    mode: str,
    *,
    tp: int = 1,
    max_tokens: int = 2048,
    chunk: int | None = None,
    max_num_tokens: int | None = None,
) -> TorchLlmArgs:
    """The replay's arguments for the KV cache manager ``mode`` (``KV_MANAGER_MODES``) with
    ``preset``'s connector (None: no connector)."""
    connector = (
        None
        if preset is None
        else KvCacheConnectorConfig(connector=preset.name, server_url=preset.server_url)
    )
    base = llm_args_for(
        mode,
        connector,
        model="replay/qwen-like",
        tensor_parallel_size=tp,
        tokens_per_block=TPB,
        max_tokens=max_tokens,
        chunk=chunk,
    )
    return base if max_num_tokens is None else dataclasses.replace(base, max_num_tokens=max_num_tokens)


def prompt(n: int, start: int = 1) -> list[int]:
    return [(start * 131 + 17 * i + (i * i) % 7) % MODEL.vocab_size for i in range(n)]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def baseline(
    prompts: list[list[int]], new_tokens: int, device: str = "cpu", **kw: object
) -> list[GenerationResult]:
    """The same prompts through an executor with no connector (each on a cold pool)."""
    return [
        ReplayExecutor(llm_args(None, **kw), MODEL, device=device).generate([p], new_tokens)[0]
        for p in prompts
    ]


def assert_same_output(got: GenerationResult, want: GenerationResult) -> None:
    assert got.tokens == want.tokens
    assert torch.equal(got.logits, want.logits)


def logits_digest(result: GenerationResult) -> str:
    """A digest of ``result``'s logits, bit for bit: equal digests, equal logits (across processes)."""
    return hashlib.sha256(result.logits.cpu().contiguous().numpy().tobytes()).hexdigest()


def engine_stats():  # noqa: ANN201
    return process_engine().engine.stats
