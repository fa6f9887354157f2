"""What the scheduler (rank 0) hands every worker each iteration: plain data, so it pickles.

A layer group's block-id list is indexed by block ordinal: entry ``i`` is the page of tokens
``[i * tokens_per_block, (i + 1) * tokens_per_block)``, ``-1`` where the group has no page. Every
:class:`Transfer` covers only ordinals that have a page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lmcache.keys import CacheSalt
from lmcache.transfer import BlockTransfer


class TargetId(NamedTuple):
    """One pool the cache keys separately: a layer group's memory region (V1 pools: ``(0, 0)``)."""

    group: int
    region: int


class PinKey(NamedTuple):
    """Who holds a lookup's pins: a request (``"req"``, legacy lookups) or a reservation (``"res"``)."""

    kind: str
    id: int


@dataclass(frozen=True)
class Prompt:
    """A request's prompt tokens and tenant salt.

    ``hashes``, when the back-end hashed the prompt at lookup, names its full chunks per target
    (opaque to the planner); loads and saves then send those instead of the tokens.
    """

    tokens: list[int]
    salt: CacheSalt
    hashes: dict[TargetId, Any] | None = None

    def up_to(self, end: int, chunk_size: int) -> Prompt:
        """The tokens through the chunk holding token ``end - 1`` (a chunk's key needs all of it)."""
        return Prompt(self.tokens[: -(-end // chunk_size) * chunk_size], self.salt, self.hashes)


@dataclass(frozen=True)
class Found:
    """A lookup's answer: the tokens cached (pinned), and the prompt's chunk hashes per target if the
    index hashed it for this lookup (loads and saves then name chunks by them; see ``Prompt``)."""

    hit: int
    hashes: dict[TargetId, Any] | None = None


@dataclass(frozen=True)
class Transfer:
    """KV of tokens ``[start, end)`` of one layer group, between the cache and ``block_ids``.

    ``block_ids`` is the group's whole ordinal-indexed list; every ordinal in ``[start, end)``
    has a page (``>= 0``); entries outside the range are never read.
    """

    request_id: int
    prompt: Prompt
    group: int
    block_ids: list[int]
    start: int
    end: int

    def for_target(self, target: TargetId) -> BlockTransfer[Any]:
        """What one pool target of the group moves: the prompt as the target's hashes when the
        back-end hashed it (``Prompt.hashes``), else as token ids."""
        hashes = self.prompt.hashes.get(target) if self.prompt.hashes else None
        prompt = hashes if hashes is not None else self.prompt.tokens
        return BlockTransfer(prompt, self.prompt.salt, self.block_ids, self.start, self.end)


@dataclass(frozen=True)
class LoadPlan:
    """One promised load of a request, all layer groups; it completes (and is reported) as one.
    A group has one transfer per run of blocks with pages (a sliding window with sink blocks: two).

    ``reservation_id`` is set for a V2 prefix load (reported by ``get_finished_prefix_loads``);
    otherwise an async load is reported by request id from ``get_finished``. ``required`` is how
    many prompt tokens the request still needed (for the "Retrieved" log line).
    """

    request_id: int
    pin: PinKey
    transfers: list[Transfer]
    start: int
    end: int
    is_async: bool
    required: int
    reservation_id: int | None = None


@dataclass
class ConnectorMetadata:
    """The iteration's plan. ``backend_context`` is what the back-end's workers need from rank 0
    (the cache server's pin owners); None for the in-process engine.

    ``saves[i]`` is save number ``first_save_id + i``; ``fence_saves`` names saves (of this or an
    earlier iteration) whose pages TRT-LLM may give to another request before the next forward,
    which must follow their copies (:mod:`lmcache.integration.tensorrt_llm.window_fence`)."""

    loads: list[LoadPlan] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)
    backend_context: Any = None
    first_save_id: int = 0
    fence_saves: list[int] = field(default_factory=list)
