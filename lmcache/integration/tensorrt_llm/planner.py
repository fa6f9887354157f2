"""Scheduler-side bookkeeping shared by both adapters: what to load and save, per request.

Rules it keeps (each one a bug in some connector before it):
- loads are block-aligned, cover only ``[num_computed_tokens, hit)`` so blocks TRT-LLM reused are
  never rewritten, and never claim the last prompt token;
- hits are pinned at lookup, so eviction cannot turn a promised load into garbage;
- every chunk that is fully computed after a forward is saved once, after that forward: chunked
  prefill steps and generated tokens included (``computed_position + num_scheduled_tokens``).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmcache.config import LMCacheEngineConfig
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings, request_salt
from lmcache.logging import init_logger

logger = init_logger(__name__)


class CacheIndex(Protocol):
    """The cache as the scheduler sees it: in-process engine or the cache server."""

    def prompt_hashes(self, tokens: list[int], salt: str | int | None) -> Any:
        """The prompt's chunk hashes, if loads and saves should name its chunks by them (hashed once
        here, then sent instead of the tokens; opaque to the planner); None: they carry tokens."""
        ...

    def lookup(
        self, tokens: list[int], salt: str | int | None, pin_id: Hashable, chunk_hashes: Any
    ) -> int: ...

    def release(self, pin_id: Hashable) -> None: ...


@dataclass
class LoadSpec:
    """Load ``tokens[start:end]`` of a request into ``block_ids`` (block-aligned range).

    ``required`` is how many prompt tokens the request still needed after TRT-LLM's own match.
    """

    request_id: int
    tokens: list[int]
    salt: str | int | None
    block_ids: list[int]
    start: int
    end: int
    required: int
    is_async: bool = False
    chunk_hashes: Any = None
    """The prompt's chunk hashes (from the lookup), naming every chunk of the load."""


@dataclass
class SaveSpec:
    """Save the chunks of ``tokens`` in ``[start, end)`` from ``block_ids`` after this forward."""

    request_id: int
    tokens: list[int]
    salt: str | int | None
    block_ids: list[int]
    start: int
    end: int
    chunk_hashes: Any = None
    """The prompt's chunk hashes (from the lookup) when they name every chunk up to ``end``."""


@dataclass
class ConnectorMetadata:
    """Broadcast from rank 0 to every worker each iteration; plain data, so it pickles."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Request:
    request_id: int
    tokens: list[int]
    salt: str | int | None
    prompt_len: int
    block_ids: list[int] = field(default_factory=list)
    load_start: int = 0
    load_end: int = 0
    load_async: bool = False
    load_planned: bool = False
    saved_until: int = 0
    save_planned: bool = False
    reported: bool = False
    chunk_hashes: Any = None
    """The prompt's full chunks' hashes, from the lookup (see ``CacheIndex.prompt_hashes``)."""


class Planner:
    """Turns TRT-LLM's scheduler callbacks into ``ConnectorMetadata``."""

    def __init__(
        self, settings: ConnectorSettings, config: LMCacheEngineConfig, index: CacheIndex, log_prefix: str
    ) -> None:
        self.settings = settings
        self.config = config
        self.index = index
        self.log_prefix = log_prefix
        self._requests: dict[int, _Request] = {}

    # -- get_num_new_matched_tokens ----------------------------------------------------------

    def match(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        request_id = int(request.request_id)
        tokens = list(request.get_tokens(0))
        prompt_len = int(getattr(request, "prompt_len", len(tokens)) or len(tokens))
        tokens = tokens[:prompt_len]
        salt = request_salt(request)
        state = _Request(request_id, tokens, salt, prompt_len)
        previous = self._requests.get(request_id)
        self._forget(request_id)
        self._requests[request_id] = state
        tpb = self.settings.tokens_per_block
        hit = 0
        if prompt_len > 1:
            # TRT-LLM asks again each iteration a request waits for room: hash its prompt once.
            hashed = previous.chunk_hashes if previous is not None else None
            if hashed is None or previous is None or previous.salt != salt or previous.tokens != tokens:
                hashed = self.index.prompt_hashes(tokens, salt)
            state.chunk_hashes = hashed
            hit = self.index.lookup(tokens, salt, request_id, state.chunk_hashes)
        # Never claim the last prompt token: TRT-LLM must compute it to sample.
        usable = min(hit, prompt_len - 1) // tpb * tpb
        new_matched = 0
        if num_computed_tokens % tpb:
            logger.debug(
                "%s: req %d device match %d is not block-aligned; not loading",
                self.log_prefix,
                request_id,
                num_computed_tokens,
            )
        elif usable > num_computed_tokens:
            new_matched = usable - num_computed_tokens
        if new_matched and new_matched < self.config.min_retrieve_tokens:
            new_matched = 0
        state.saved_until = hit // self.settings.chunk_size * self.settings.chunk_size
        if new_matched:
            state.load_start, state.load_end = num_computed_tokens, usable
            state.load_async = self.config.enable_async_loading
        elif hit:  # a miss pinned nothing: no release (in MP mode, a round trip saved per miss)
            self.index.release(request_id)
        logger.debug(
            "%s: req %d prompt=%d num_computed=%d lmcache_cached=%d new_matched=%d",
            self.log_prefix,
            request_id,
            prompt_len,
            num_computed_tokens,
            hit,
            new_matched,
        )
        return new_matched, bool(new_matched) and state.load_async

    # -- update_state_after_alloc -------------------------------------------------------------

    def after_alloc(self, request: Any, block_ids: list[int]) -> None:
        state = self._requests.get(int(request.request_id))
        if state is not None:
            state.block_ids = [int(b) for b in block_ids if int(b) >= 0]  # -1: no page (BAD_PAGE_INDEX)

    # -- build_connector_meta -----------------------------------------------------------------

    def build(self, scheduler_output: Any) -> ConnectorMetadata:
        meta = ConnectorMetadata()
        for data in getattr(scheduler_output, "new_requests", []) or []:
            self._on_report(data, first=True, meta=meta)
        for data in getattr(scheduler_output, "cached_requests", []) or []:
            self._on_report(data, first=False, meta=meta)
        # Loads come from the alloc feedback: async-loading requests are not in the output at all.
        chunk = self.settings.chunk_size
        for state in self._requests.values():
            if state.load_end > state.load_start and not state.load_planned and state.block_ids:
                meta.loads.append(
                    LoadSpec(
                        state.request_id,
                        state.tokens[: -(-state.load_end // chunk) * chunk],
                        state.salt,
                        list(state.block_ids),
                        state.load_start,
                        state.load_end,
                        state.prompt_len - state.load_start,
                        state.load_async,
                        state.chunk_hashes,
                    )
                )
                state.load_planned = True
        return meta

    def _on_report(self, data: Any, first: bool, meta: ConnectorMetadata) -> None:
        request_id = int(data.request_id)
        new_tokens = list(getattr(data, "new_tokens", None) or [])
        new_blocks = [int(b) for b in (getattr(data, "new_block_ids", None) or []) if int(b) >= 0]
        state = self._requests.get(request_id)
        if state is None or (first and state.reported):
            # No lookup happened (block reuse off) or the request was replayed: start afresh.
            state = _Request(request_id, [], request_salt(data), len(new_tokens))
            self._requests[request_id] = state
        if first:
            state.tokens = new_tokens
            state.block_ids = new_blocks
        else:
            state.tokens.extend(new_tokens)
            state.block_ids.extend(new_blocks)
        computed_position = int(getattr(data, "computed_position", 0) or 0)
        scheduled = getattr(data, "num_scheduled_tokens", None)
        if scheduled is None:  # TRT-LLM before 1.2.0rc2: a context step computes the rest of the prompt.
            scheduled = max(1, state.prompt_len - computed_position)
        if first and state.load_end > state.load_start and not state.load_async:
            # A synchronous hit: computed_position excludes the tokens we load.
            computed_position += state.load_end - state.load_start
        state.reported = True
        computed = min(
            computed_position + int(scheduled), len(state.tokens), len(state.block_ids) * self._tpb
        )
        self._plan_save(state, computed, meta)

    @property
    def _tpb(self) -> int:
        return self.settings.tokens_per_block

    def _plan_save(self, state: _Request, computed: int, meta: ConnectorMetadata) -> None:
        chunk = self.settings.chunk_size
        limit = computed if self.config.save_decode_cache else min(computed, state.prompt_len)
        end = limit // chunk * chunk
        if self.config.save_unfull_chunk and limit == state.prompt_len:
            end = limit  # the prompt's partial last chunk; the engine keeps its whole blocks
        if end <= state.saved_until:
            return
        hashed = state.prompt_len // chunk * chunk  # the lookup hashed the prompt's full chunks
        meta.saves.append(
            SaveSpec(
                state.request_id,
                state.tokens[:end],
                state.salt,
                state.block_ids[: -(-end // self._tpb)],
                state.saved_until,
                end,
                state.chunk_hashes if end <= hashed else None,
            )
        )
        state.saved_until = end // chunk * chunk if end % chunk else end
        state.save_planned = True

    # -- request_finished ---------------------------------------------------------------------

    def finished(self, request: Any) -> bool:
        """Forget the request; True when saves were planned for it (the worker reports them landed)."""
        request_id = int(request.request_id)
        state = self._requests.get(request_id)
        self._forget(request_id)
        return state is not None and state.save_planned

    def _forget(self, request_id: int) -> None:
        state = self._requests.pop(request_id, None)
        if state is not None and not state.load_planned and state.load_end > state.load_start:
            self.index.release(request_id)
