"""The prompt a store, retrieve, ``store_reserve`` or ``load`` names, and the range it asks for, checked
once for every handler (:func:`request_prompt`)."""

from __future__ import annotations

from typing import Protocol, TypeAlias

import numpy as np

from lmcache.engine import CacheEngine, KeySpace
from lmcache.keys import ChunkHashes
from lmcache.server import protocol as P

__all__ = ["InvalidPrompt", "PromptRequest", "RequestPrompt", "request_prompt"]


class InvalidPrompt(ValueError):
    """The request's prompt or range is malformed (the reply's code is ``invalid``)."""


RequestPrompt: TypeAlias = "np.ndarray | ChunkHashes"
"""A request's prompt: its token ids, or the chunk hashes it sent instead."""


class PromptRequest(Protocol):
    """The fields of a request that name a prompt and a range of it."""

    tokens: P.WireIds
    cache_salt: str | int | None
    chunk_hashes: bytes | None
    start: int
    end: int


def request_prompt(engine: CacheEngine, space: KeySpace, req: PromptRequest) -> RequestPrompt:
    """The request's prompt: its token ids, or the chunk hashes it sent instead (the salt folded in),
    with ``[start, end)`` checked against it; raises :class:`InvalidPrompt` naming what is wrong."""
    if req.chunk_hashes is not None:
        if len(req.tokens) or req.cache_salt is not None:
            raise InvalidPrompt(
                "send the prompt either as tokens (with cache_salt) or as chunk_hashes (the salt folded in), "
                "not both"
            )
        if req.start > req.end:
            raise InvalidPrompt(f"range [{req.start}, {req.end}) ends before it starts")
        digest_size = engine.hasher(space).digest_size
        return ChunkHashes.from_bytes(req.chunk_hashes, digest_size, engine.config.chunk_size)
    tokens = P.ids_from_wire(req.tokens, "tokens")
    if not req.start <= req.end <= len(tokens):
        raise InvalidPrompt(
            f"range [{req.start}, {req.end}) is not within the request's {len(tokens)} tokens"
        )
    return tokens
