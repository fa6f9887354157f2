"""The forward of one executor batch: streams, per-layer connector hooks, sampling.

``ForwardPass`` runs what ``PyExecutor`` does between ``start_load_kv`` and the host update: the
model forward on the execution stream (with ``layer_pre_hook`` / ``layer_post_hook`` in eager
mode), the forward-pass callables, ``wait_for_save``, the request state update TRT-LLM makes
before the host sees the tokens, and greedy sampling onto the device tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .connector_manager import KvCacheConnectorManager
from .layer_groups import GroupedKvPool
from .model import ForwardItem, TinyDecoder
from .request import LlmRequest, LlmRequestState

PagesOf = Callable[[LlmRequest], list[list[int]]]


@dataclass
class Batch:
    """The requests of one forward, and the token (and logits row) sampled for each, by id."""

    context: list[LlmRequest]
    generation: list[LlmRequest]
    sampled: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)

    def drop(self, req: LlmRequest) -> None:
        """Forget a request's part of this batch (a preempted victim's in-flight token)."""
        self.context = [r for r in self.context if r is not req]
        self.generation = [r for r in self.generation if r is not req]
        self.sampled.pop(req.request_id, None)


class Streams:
    """The executor thread's "current" stream and the execution stream (None on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.current = torch.cuda.Stream(device) if self.cuda else None
        self.execution = torch.cuda.Stream(device) if self.cuda else None

    @contextlib.contextmanager
    def on_current(self) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        with torch.cuda.stream(self.current):
            yield

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Execution stream waits on current before, current waits on execution after."""
        if not self.cuda:
            yield
            return
        self.execution.wait_stream(self.current)
        with torch.cuda.stream(self.execution):
            yield
        self.current.wait_stream(self.execution)

    def hook_stream(self) -> Any:
        return torch.cuda.current_stream() if self.cuda else None


@dataclass
class ForwardPass:
    """Runs batches through ``model`` over ``pools`` on ``streams``; CUDA graphs skip the hooks of
    generation-only batches, as TRT-LLM's graph replay does."""

    model: TinyDecoder
    pools: GroupedKvPool
    streams: Streams
    cuda_graphs: bool

    def warmup(self, pages: list[list[int]]) -> None:
        """One throw-away forward of one token into ``pages`` (before the connector sees the pool)."""
        with self.streams.on_current(), self.streams.forward():
            self.model.forward([ForwardItem([0], 0, pages, False)], self.pools)

    def run(self, batch: Batch, manager: KvCacheConnectorManager | None, pages: PagesOf) -> None:
        """Forward (hooks only in eager mode), forward-pass callables, ``wait_for_save``, sampling."""
        items = []
        for req in batch.context:
            pos, chunk = (
                req.context_current_position,
                min(req.context_remaining_length, req.context_chunk_size),
            )
            last = pos + chunk == req.prompt_len
            items.append(ForwardItem(req.device_tokens[pos : pos + chunk], pos, pages(req), last))
        for req in batch.generation:
            items.append(ForwardItem([req.device_tokens[-1]], req.num_kv, pages(req), True))
        eager = not (self.cuda_graphs and not batch.context)
        hooks = manager is not None and eager
        with self.streams.forward():
            stream = self.streams.hook_stream()
            logits = self.model.forward(
                items,
                self.pools,
                pre_layer=(lambda i: manager.layer_pre_hook(i, stream)) if hooks else None,
                post_layer=(lambda i: manager.layer_post_hook(i, stream)) if hooks else None,
            )
            if manager is not None:
                manager.run_forward_pass_callables()
        if manager is not None:
            manager.wait_for_save(self.streams.current)
        # State update right after the forward (TRT-LLM does this before the host sees tokens).
        for req in batch.context:
            req.context_current_position += min(req.context_remaining_length, req.context_chunk_size)
            req.num_kv = req.context_current_position
            if req.context_remaining_length == 0:
                req.state = LlmRequestState.GENERATION_IN_PROGRESS
        for req in batch.generation:
            req.num_kv += 1
        for req, row in zip(batch.context + batch.generation, logits, strict=True):
            if row is not None:
                token = int(row.argmax().item())
                req.device_tokens.append(token)
                batch.sampled[req.request_id] = (token, row.cpu())
