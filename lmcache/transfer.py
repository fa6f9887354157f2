"""One transfer of KV between the cache and a pool's blocks, as planner, engine and client see it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar, Union

import numpy as np

from lmcache.keys import CacheSalt

if TYPE_CHECKING:
    import torch

BlockIds = Union[Sequence[int], np.ndarray, "torch.Tensor"]
PromptT = TypeVar("PromptT")


@dataclass(frozen=True)
class BlockTransfer(Generic[PromptT]):
    """KV of the prompt's tokens ``[start, end)``, between the cache and the blocks ``block_ids``.

    ``prompt`` names the chunks: token ids (``lmcache.keys.Tokens``), or the prompt's full chunks
    already hashed with the salt folded in (the engine's ``ChunkHashes``, the cache server client's
    ``PromptHashes``). ``salt`` is the tenant salt of token ids; hashes carry their own.

    ``block_ids`` is indexed by block ordinal: entry ``j`` is the pool block holding tokens
    ``[j * tokens_per_block, (j + 1) * tokens_per_block)``. Only the entries of the blocks
    ``[start, end)`` touches are read; the others may be ``-1`` (no page, e.g. a sliding window's
    passed blocks).

    A store saves the chunks starting at or after ``start`` (chunk-aligned) and ending by ``end``
    (with ``save_unfull_chunk``, also the whole blocks of a last partial chunk). A retrieve loads
    ``[start, end)`` (both block-aligned), and its prompt must reach the end of the chunk holding
    ``end``: a chunk's key covers all of its tokens.
    """

    prompt: PromptT
    salt: CacheSalt
    block_ids: BlockIds
    start: int
    end: int

    def chunks_touched(self, chunk_size: int) -> int:
        """How many chunks of ``chunk_size`` tokens hold some of the tokens ``[start, end)``."""
        return max(0, -(-self.end // chunk_size) - self.start // chunk_size)
