"""Geometry of TensorRT-LLM's KV pool, and the signature that keeps other layouts' bytes apart."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PoolLayout:
    """One rank's pool ``[num_blocks, num_layers, kv_factor, block_elems]``; a block's row is contiguous.

    A cached chunk is ``chunk_size / tokens_per_block`` consecutive rows stored verbatim, so the
    bytes are only meaningful to a pool with the same row geometry and dtype.
    """

    num_blocks: int
    num_layers: int
    kv_factor: int
    block_elems: int
    tokens_per_block: int
    dtype: torch.dtype

    @classmethod
    def of_pool(cls, pool: torch.Tensor, tokens_per_block: int) -> PoolLayout:
        if pool.dim() != 4:
            raise ValueError(
                f"KV pool must be 4-D [num_blocks, num_layers, kv_factor, block_elems], got shape "
                f"{tuple(pool.shape)}"
            )
        if not pool[0].is_contiguous() or pool.stride(0) < pool[0].numel():
            raise ValueError(
                "each page (row) of a KV pool must be contiguous and rows must not overlap "
                f"(shape {tuple(pool.shape)}, strides {pool.stride()})"
            )
        if tokens_per_block <= 0 or pool.shape[3] % tokens_per_block:
            raise ValueError(
                f"tokens_per_block={tokens_per_block} does not divide the pool's block size "
                f"{pool.shape[3]} elements"
            )
        num_blocks, num_layers, kv_factor, block_elems = (int(s) for s in pool.shape)
        return cls(num_blocks, num_layers, kv_factor, block_elems, tokens_per_block, pool.dtype)

    @property
    def row_shape(self) -> tuple[int, int, int]:
        return (self.num_layers, self.kv_factor, self.block_elems)

    @property
    def row_bytes(self) -> int:
        return self.num_layers * self.kv_factor * self.block_elems * self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.row_bytes // self.tokens_per_block

    def blocks_per_chunk(self, chunk_size: int) -> int:
        if chunk_size % self.tokens_per_block:
            raise ValueError(
                f"chunk_size={chunk_size} must be a multiple of tokens_per_block={self.tokens_per_block}; "
                f"set LMCACHE_CHUNK_SIZE (the cache server: --chunk-size) to a multiple such as "
                f"{self.tokens_per_block * 8}"
            )
        return chunk_size // self.tokens_per_block

    def signature(self) -> bytes:
        """Everything that decides what a chunk's bytes mean, except the pool's length."""
        dtype_name = str(self.dtype).removeprefix("torch.")
        return (
            f"{dtype_name}/L{self.num_layers}/KV{self.kv_factor}/E{self.block_elems}/T{self.tokens_per_block}"
        ).encode()
