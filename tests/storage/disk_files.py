"""Chunk files for the disk-store tests: one namespace, numbered keys, payloads of one size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmcache.keys import ChunkKey
from lmcache.storage.chunk_format import Namespace, encode_header
from lmcache.storage.disk_store import DiskStore

NS = Namespace("m", b"sig")
N = 1000


def key(i: int) -> ChunkKey:
    return ChunkKey(i.to_bytes(32, "little"), 1, 0)


def payload(i: int) -> memoryview:
    return memoryview(np.full(N, i % 251, dtype=np.uint8))


SIZE = len(encode_header(key(0), NS, 7, payload(0))) + N
"""Bytes of one chunk file."""


def on_disk(root: Path) -> int:
    """Bytes of the chunk files under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*.kv"))


def read_key(store: DiskStore, k: ChunkKey) -> bytes | None:
    """The payload stored under ``k``, or None when it is not served."""
    entry = store.lookup(NS, k)
    out = bytearray(N)
    return bytes(out) if entry is not None and store.read_into(NS, k, entry, memoryview(out)) else None
