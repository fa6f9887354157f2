"""Token and block ids on the wire: little-endian int64 bytes (re-exported by
:mod:`lmcache.server.protocol`)."""

from __future__ import annotations

import struct
from typing import Any

TOKEN_BYTES = 8
"""Bytes of one id in the wire form."""


def _pack_int64(ids: list[int]) -> bytes:
    # A fresh Struct packs a long list faster than struct.pack(fmt, ...) (benchmarks/RESULTS.md, D15).
    return struct.Struct(f"<{len(ids)}q").pack(*ids)


def tokens_to_bytes(tokens: Any) -> bytes:
    """Token (or block) ids as little-endian int64 bytes, the compact wire form."""
    import numpy as np

    if isinstance(tokens, bytes):
        return tokens
    if isinstance(tokens, (bytearray, memoryview)):
        return bytes(tokens)
    if isinstance(tokens, list):  # TRT-LLM hands over lists: struct beats numpy (RESULTS.md, D15)
        try:
            return _pack_int64(tokens)
        except struct.error:
            pass  # not all ints in int64 range: let numpy convert or raise its error
    if hasattr(tokens, "detach"):  # torch.Tensor
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens, dtype="<i8")
    if arr.ndim != 1:
        raise ValueError(f"ids must be a flat sequence, got shape {arr.shape}")
    return arr.tobytes()


WireIds = bytes | memoryview | list[int]
"""Ids as a request carries them: int64 bytes (a view into the frame once decoded) or a list."""


def wire_id_count(ids: WireIds) -> int:
    """How many ids ``ids`` holds."""
    return len(ids) // TOKEN_BYTES if isinstance(ids, (bytes, memoryview)) else len(ids)


def ids_from_wire(ids: WireIds, what: str) -> Any:
    """Wire ids as a read-only numpy int64 array (over the bytes, not a copy); bytes must be a whole
    number of int64s."""
    import numpy as np

    if isinstance(ids, (bytes, memoryview)):
        if isinstance(ids, memoryview):
            ids = ids.toreadonly()  # a view into a received frame, which may be a bytearray
        if len(ids) % 8:
            raise ValueError(f"{what}: {len(ids)} bytes is not a whole number of little-endian int64s")
        return np.frombuffer(ids, dtype="<i8")
    try:
        return np.asarray(ids, dtype="<i8")
    except OverflowError:
        raise ValueError(f"{what}: ids must fit in int64") from None
