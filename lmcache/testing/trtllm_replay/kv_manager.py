"""Page bookkeeping over layer groups: V1's block manager (one group) or V2's per-group pages.

Each group has its own ``BlockManager`` (own slot ids, starting at a different slot per group so a
connector that mixes groups up is caught). Prefix reuse stays V1's and only runs with a single
full-attention group; with a sliding group device reuse is off, so every hit comes from the
connector. Pages a sliding window has passed stay allocated until the request ends (deterministic,
no page reuse racing a connector) but are *reported* ``-1`` and never read by the model, unless
the executor runs with ``free_passed_pages``: then, as in V2, they go back to the pool before the
next forward (``free_passed``) and the next allocation takes them first.
"""

from __future__ import annotations

from .block_pool import BlockManager
from .layer_groups import LayerGroup

BAD_PAGE_INDEX = -1  # TRT-LLM's ``kv_cache_manager_v2.BAD_PAGE_INDEX``


class GroupedBlockManager:
    """Allocation, GUARANTEED_NO_EVICT reservation and reuse of one request's pages in every group."""

    def __init__(
        self,
        groups: list[LayerGroup],
        num_blocks: int,
        tokens_per_block: int,
        enable_reuse: bool,
        sink_tokens: int = 0,
        recycle_first: bool = False,
    ) -> None:
        """``sink_tokens``: the first tokens sliding windows keep seeing; their blocks are never masked;
        ``recycle_first``: freed pages are handed out before never-used ones (V2)."""
        reuse = enable_reuse and len(groups) == 1 and groups[0].window is None
        self.groups = groups
        self.tokens_per_block = tokens_per_block
        self.sink_blocks = -(-sink_tokens // tokens_per_block)
        self.managers = [
            BlockManager(
                num_blocks,
                tokens_per_block,
                reuse,
                first_free=g * num_blocks // len(groups),
                recycle_first=recycle_first,
            )
            for g in range(len(groups))
        ]

    @property
    def primary(self) -> BlockManager:
        """Group 0's manager (the only one under V1); it holds the reuse table."""
        return self.managers[0]

    @property
    def enable_reuse(self) -> bool:
        return self.primary.enable_reuse

    def blocks_for(self, num_tokens: int) -> int:
        return self.primary.blocks_for(num_tokens)

    def try_reserve(self, seq_id: int, num_blocks: int, salt_id: int | None = None) -> bool:
        """Reserve ``num_blocks`` in every group (the groups' accounting moves in lock step)."""
        if not self.primary.try_reserve(seq_id, num_blocks, salt_id):
            return False
        for manager in self.managers[1:]:
            if not manager.try_reserve(seq_id, num_blocks, salt_id):
                raise RuntimeError("layer groups' page accounting diverged")
        return True

    def match_prefix(self, seq_id: int, prompt: list[int]) -> int:
        """Take group 0's reusable prefix (0 when reuse is off); returns matched tokens."""
        return self.primary.match_prefix(seq_id, prompt)

    def grow(self, seq_id: int, num_tokens: int) -> None:
        for manager in self.managers:
            manager.grow(seq_id, num_tokens)

    def pages(self, seq_id: int, history: int) -> list[list[int]]:
        """Complete page list per group, indexed by block ordinal; in a sliding group with window
        ``W``, ordinals ``[num_sink_blocks, (history + 1 - W) // tpb)`` read ``-1`` (``history`` =
        tokens computed)."""
        lists = []
        for group, manager in zip(self.groups, self.managers, strict=True):
            ids = manager.get_cache_indices(seq_id) if manager.has_sequence(seq_id) else []
            if group.window is not None:
                masked = min(len(ids), max(0, (history + 1 - group.window) // self.tokens_per_block))
                for ordinal in range(self.sink_blocks, masked):
                    ids[ordinal] = BAD_PAGE_INDEX
            lists.append(ids)
        return lists

    def free_passed(self, seq_id: int, history: int) -> list[list[int]]:
        """Give back, in every sliding group, the pages ``pages`` reports ``-1`` with ``history``
        tokens computed: none of them holds a key the next token (position ``history``) can see.
        Sink pages stay. Returns the pages given back per group."""
        released = []
        for group, manager in zip(self.groups, self.managers, strict=True):
            passed = 0 if group.window is None else (history + 1 - group.window) // self.tokens_per_block
            if passed <= self.sink_blocks or not manager.has_sequence(seq_id):
                released.append([])
                continue
            released.append(manager.release_blocks(seq_id, self.sink_blocks, passed))
        return released

    def has_allocation(self, seq_id: int) -> bool:
        return self.primary.has_sequence(seq_id)

    def store_blocks_for_reuse(self, seq_id: int, tokens: list[int], num_kv: int) -> None:
        self.primary.store_blocks_for_reuse(seq_id, tokens, num_kv)

    def remove_sequence(self, seq_id: int, tokens: list[int] | None = None, num_kv: int = 0) -> None:
        """Publish group 0's reusable blocks (when ``tokens`` is given) and free every group's pages."""
        self.primary.remove_sequence(seq_id, tokens, num_kv)
        for manager in self.managers[1:]:
            manager.remove_sequence(seq_id)
