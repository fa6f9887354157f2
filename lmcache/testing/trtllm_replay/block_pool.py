"""The paged KV pool and the block manager with prefix reuse (TRT-LLM's V1 KV cache manager).

Pool layout is TRT-LLM's primary pool: ``[num_blocks, num_layers, 2 (K|V), heads*tpb*head_dim]``
per rank, each slab HND ``[num_kv_heads_per_rank, tokens_per_block, head_dim]``. Every rank has its
own pool but the block manager is replicated, so one set of block ids addresses all ranks' pools.

Reuse mirrors what a connector can observe: full blocks are keyed by a hash chain over
(parent hash, salt, block tokens), published once their K/V are computed, matched whole-block
from the start of a new prompt (never the last prompt token), and, once unreferenced, kept in
an LRU that fresh allocations evict from.

Which free block an allocation gets: V1's eviction policy queues a released block behind every
free one (so never-used blocks go first); KVCacheManagerV2's slot allocator hands out recycled
slots before never-used ones (``recycle_first``), so under V2 a page a request just gave back is
the next page another request gets.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


def block_hash(parent: int | None, tokens: list[int], salt_id: int | None) -> int:
    """One link of the chain: H(parent, salt (first block only), tokens) as an unsigned 64-bit int."""
    h = hashlib.blake2b(digest_size=8)
    h.update((parent if parent is not None else 0).to_bytes(8, "little"))
    if parent is None and salt_id is not None:
        h.update(b"salt")
        h.update(salt_id.to_bytes(8, "little"))
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little")


def hash_chain(tokens: list[int], tokens_per_block: int, salt_id: int | None = None) -> list[int]:
    """Hashes of every full block of ``tokens`` (what ``RequestData.block_hashes`` carries)."""
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(tokens) - tokens_per_block + 1, tokens_per_block):
        parent = block_hash(parent, tokens[start : start + tokens_per_block], salt_id)
        hashes.append(parent)
    return hashes


NO_PAGE = -1
"""A block-list entry whose page was given back (TRT-LLM's ``BAD_PAGE_INDEX``)."""

PoolAllocator = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]
"""Allocates one rank's zero-filled pool tensor of ``(shape, dtype, device)``."""


def zeros_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The default :data:`PoolAllocator`: ``torch.zeros`` (PyTorch's caching allocator)."""
    return torch.zeros(shape, dtype=dtype, device=device)


class KvPool:
    """One primary pool tensor per TP rank, all sharing block ids."""

    def __init__(
        self,
        *,
        num_blocks: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        tokens_per_block: int,
        tp_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        local_ranks: Sequence[int] | None = None,
        allocate: PoolAllocator = zeros_pool,
    ) -> None:
        """``local_ranks``: the ranks whose pools live in this process (default: all); the others'
        entries in ``tensors`` are empty ``meta`` tensors. ``allocate``: how a local pool is made
        (e.g. :func:`lmcache.testing.vmm_pool.allocate_vmm_pool`, memory like KVCacheManagerV2's)."""
        if num_kv_heads % tp_size:
            raise ValueError(f"num_kv_heads={num_kv_heads} must be divisible by tp_size={tp_size}")
        self.num_blocks = num_blocks
        self.num_layers = num_layers
        self.heads_per_rank = num_kv_heads // tp_size
        self.head_dim = head_dim
        self.tokens_per_block = tokens_per_block
        self.tp_size = tp_size
        block_elems = self.heads_per_rank * tokens_per_block * head_dim
        # Zero-filled (TRT-LLM's cudaMalloc'd pool is not) so a never-written slot is never NaN.
        local = range(tp_size) if local_ranks is None else local_ranks
        shape = (num_blocks, num_layers, 2, block_elems)
        self.tensors = [
            allocate(shape, dtype, torch.device(device))
            if rank in local
            else torch.empty(0, dtype=dtype, device="meta")
            for rank in range(tp_size)
        ]

    def slab(self, rank: int, block: int, layer: int, kv: int) -> torch.Tensor:
        """HND view ``[heads_per_rank, tokens_per_block, head_dim]`` of one block's K or V slab."""
        return self.tensors[rank][block, layer, kv].view(self.heads_per_rank, self.tokens_per_block, -1)

    def write(self, rank: int, layer: int, block: int, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one token's K/V (``[heads_per_rank, head_dim]`` each) at ``offset`` of ``block``."""
        self.slab(rank, block, layer, 0)[:, offset, :] = k.to(self.tensors[rank].dtype)
        self.slab(rank, block, layer, 1)[:, offset, :] = v.to(self.tensors[rank].dtype)

    def gather(
        self, rank: int, layer: int, block_ids: torch.Tensor, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions ``[0, num_tokens)`` read from the pool, ``[heads, num_tokens, dim]``."""
        n_blocks = (num_tokens + self.tokens_per_block - 1) // self.tokens_per_block
        rows = self.tensors[rank][block_ids[:n_blocks], layer]  # [nb, 2, elems]
        rows = rows.view(n_blocks, 2, self.heads_per_rank, self.tokens_per_block, self.head_dim)
        kv = rows.permute(1, 2, 0, 3, 4).reshape(2, self.heads_per_rank, -1, self.head_dim)
        return kv[0, :, :num_tokens].contiguous(), kv[1, :, :num_tokens].contiguous()


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None


@dataclass
class _Sequence:
    reserved: int
    salt_id: int | None
    blocks: list[int] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)  # hash chain of this sequence's published blocks


class BlockManager:
    """Block allocation, GUARANTEED_NO_EVICT reservations and the prefix-reuse table."""

    def __init__(
        self,
        num_blocks: int,
        tokens_per_block: int,
        enable_reuse: bool = True,
        first_free: int = 0,
        recycle_first: bool = False,
    ) -> None:
        """``first_free``: the block the free list starts at (V2 groups start at different slots so
        that their page ids differ); ``recycle_first``: freed blocks are allocated before
        never-used ones, oldest release first (KVCacheManagerV2's ``SlotAllocator``)."""
        if num_blocks < 1:
            raise ValueError("the pool needs at least one block")
        self.num_blocks = num_blocks
        self.tokens_per_block = tokens_per_block
        self.enable_reuse = enable_reuse
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # never published, or evicted
        self._free.rotate(-first_free)
        self.recycle_first = recycle_first
        self._recycled: deque[int] = deque()  # released unpublished blocks (``recycle_first``)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # published, unreferenced; LRU first
        self._table: dict[int, int] = {}  # hash -> block id
        self._seqs: dict[int, _Sequence] = {}

    # --- capacity -----------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.tokens_per_block - 1) // self.tokens_per_block

    @property
    def num_free_blocks(self) -> int:
        """Blocks a fresh allocation can take (free plus evictable reusable blocks)."""
        return len(self._recycled) + len(self._free) + len(self._evictable)

    def _outstanding(self) -> int:
        return sum(max(0, s.reserved - len(s.blocks)) for s in self._seqs.values())

    def try_reserve(self, seq_id: int, num_blocks: int, salt_id: int | None = None) -> bool:
        """Admit a sequence only if all its blocks can be allocated whatever happens later."""
        if num_blocks > self.num_blocks:
            raise ValueError(f"a request needing {num_blocks} blocks can never fit {self.num_blocks}")
        if self.num_free_blocks - self._outstanding() < num_blocks:
            return False
        self._seqs[seq_id] = _Sequence(reserved=num_blocks, salt_id=salt_id)
        return True

    # --- allocation ---------------------------------------------------------------------
    def _take_fresh(self) -> int:
        if self._recycled:
            block_id = self._recycled.popleft()
        elif self._free:
            block_id = self._free.popleft()
        elif self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            block = self._blocks[block_id]
            if block.hash is not None and self._table.get(block.hash) == block_id:
                del self._table[block.hash]
            block.hash = None
        else:
            raise RuntimeError("KV pool exhausted (reservation accounting is broken)")
        self._blocks[block_id].ref_count = 1
        return block_id

    def _acquire(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            self._evictable.pop(block_id, None)
        block.ref_count += 1

    def add_sequence(self, seq_id: int, prompt: list[int]) -> tuple[list[int], int]:
        """Match reusable full blocks, then allocate the rest of the prompt; returns (blocks, matched)."""
        matched = self.match_prefix(seq_id, prompt)
        self.grow(seq_id, len(prompt))
        return self.get_cache_indices(seq_id), matched

    def local_match(self, prompt: list[int], salt_id: int | None) -> int:
        """Tokens ``match_prefix`` would match now (no reference taken)."""
        if not self.enable_reuse:
            return 0
        max_blocks = (len(prompt) - 1) // self.tokens_per_block
        return len(self.lookup(prompt, salt_id)[:max_blocks]) * self.tokens_per_block

    def match_prefix(self, seq_id: int, prompt: list[int]) -> int:
        """Take the reusable full blocks of ``prompt`` (never the last token); returns matched tokens."""
        seq = self._seqs[seq_id]
        if seq.blocks:
            raise RuntimeError(f"sequence {seq_id} already allocated")
        matched_blocks: list[int] = []
        chain: list[int] = []
        if self.enable_reuse:
            max_blocks = (len(prompt) - 1) // self.tokens_per_block  # never the last prompt token
            for h in hash_chain(prompt, self.tokens_per_block, seq.salt_id)[:max_blocks]:
                block_id = self._table.get(h)
                if block_id is None:
                    break
                self._acquire(block_id)
                matched_blocks.append(block_id)
                chain.append(h)
        seq.blocks = list(matched_blocks)
        seq.committed = chain
        return len(matched_blocks) * self.tokens_per_block

    def grow(self, seq_id: int, num_tokens: int) -> None:
        """Allocate fresh blocks until positions ``[0, num_tokens)`` have one."""
        seq = self._seqs[seq_id]
        while len(seq.blocks) < self.blocks_for(num_tokens):
            seq.blocks.append(self._take_fresh())

    def add_token(self, seq_id: int, position: int) -> None:
        """Make sure a block exists for ``position`` (decode grows one block at a time)."""
        self.grow(seq_id, position + 1)

    def get_cache_indices(self, seq_id: int) -> list[int]:
        return list(self._seqs[seq_id].blocks)

    # --- reuse --------------------------------------------------------------------------
    def store_blocks_for_reuse(self, seq_id: int, tokens: list[int], num_kv: int) -> None:
        """Publish every full block whose K/V are all in the pool (``update_resources``)."""
        if not self.enable_reuse:
            return
        seq = self._seqs[seq_id]
        tpb = self.tokens_per_block
        full = min(num_kv // tpb, len(seq.blocks))
        while len(seq.committed) < full:
            i = len(seq.committed)
            parent = seq.committed[-1] if seq.committed else None
            h = block_hash(parent, tokens[i * tpb : (i + 1) * tpb], seq.salt_id)
            seq.committed.append(h)
            block = self._blocks[seq.blocks[i]]
            if block.hash is None and h not in self._table:
                block.hash = h
                self._table[h] = block.block_id
            # else: same content already published by another block; this one stays private

    def remove_sequence(self, seq_id: int, tokens: list[int] | None = None, num_kv: int = 0) -> None:
        """Publish what is reusable, then drop the sequence's references (leaves first)."""
        if tokens is not None:
            self.store_blocks_for_reuse(seq_id, tokens, num_kv)
        seq = self._seqs.pop(seq_id)
        for block_id in reversed(seq.blocks):
            if block_id != NO_PAGE:
                self._unref(block_id)

    def release_blocks(self, seq_id: int, first: int, last: int) -> list[int]:
        """Give the pages of ordinals ``[first, last)`` back while the sequence runs (V2 frees a
        sliding window's passed pages); those ordinals read ``-1`` from then on, and the pages are
        handed out again before any other free block. Returns the pages given back."""
        seq = self._seqs[seq_id]
        released = []
        for ordinal in range(first, min(last, len(seq.blocks))):
            block_id = seq.blocks[ordinal]
            if block_id == NO_PAGE:
                continue
            seq.blocks[ordinal] = NO_PAGE
            self._unref(block_id, reuse_first=True)
            released.append(block_id)
        return released

    def _unref(self, block_id: int, reuse_first: bool = False) -> None:
        """Drop one reference; an unreferenced block turns evictable (published) or free (handed out
        again before never-used blocks if ``reuse_first`` or ``recycle_first``)."""
        block = self._blocks[block_id]
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        if block.hash is not None and self._table.get(block.hash) == block_id:
            self._evictable[block_id] = None
        else:
            block.hash = None
            (self._recycled if reuse_first or self.recycle_first else self._free).append(block_id)

    def lookup(self, tokens: list[int], salt_id: int | None = None) -> list[int]:
        """Block ids of the published prefix of ``tokens`` (no reference taken; for inspection)."""
        found = []
        for h in hash_chain(tokens, self.tokens_per_block, salt_id):
            if h not in self._table:
                break
            found.append(self._table[h])
        return found

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def num_reusable_blocks(self) -> int:
        return len(self._table)
