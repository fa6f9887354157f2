"""The self-describing chunk encoding used by the disk (L2) and remote (L3) tiers.

A chunk leaves L1 as ``header || payload``; the payload is the chunk's bytes exactly as L1 holds
them (``chunk_size / tokens_per_block`` pool rows). The header carries everything needed to refuse
bytes that are not what the reader asked for::

    offset  size  field (little-endian)
    0       4     magic  b"LMKV"
    4       2     chunk format version (CHUNK_FORMAT_VERSION)
    6       2     key format version (lmcache.keys.FORMAT_VERSION)
    8       4     header length = offset of the payload (a multiple of 64)
    12      4     num_tokens
    16      8     payload length
    24      8     payload checksum: xxh3_64
    32      4     world_size      } the ChunkKey
    36      4     rank            }
    40      2     chunk hash length
    42      2     layout signature length
    44      2     model name length
    46      ...   chunk hash bytes, layout signature bytes, model name (UTF-8), zero padding
    end-8   8     header checksum: xxh3_64 of every header byte before it

Checksums are xxh3_64: it is fast on one core and releases the GIL, so verifying a chunk costs a
fraction of reading it (see benchmarks/RESULTS.md, D19), and it catches torn writes, truncation
and bit flips with probability 1 - 2^-64. It is not a defence against someone who can write the
store on purpose: neither is an unkeyed cryptographic hash (they would simply recompute it), so
blake3's extra cost (D19) would buy nothing. Which chunk the bytes belong to is established by the key
and signature fields, which must equal what the reader expects.

``decode`` verifies every field; any mismatch raises :class:`CorruptChunk`, which callers treat as
a miss, never as a load. The tiers also call :func:`check_layout`: a payload whose length does not
match the layout the namespace's signature describes (``num_tokens // tokens_per_block`` rows of
the signature's row size) is corrupt too, even with a valid header and checksum.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import BinaryIO

import blake3
import numpy as np
import xxhash

from lmcache.keys import FORMAT_VERSION, ChunkKey

__all__ = [
    "CHUNK_FORMAT_VERSION",
    "FIXED_HEADER_BYTES",
    "MAGIC",
    "ChunkHeader",
    "CorruptChunk",
    "Namespace",
    "check_header",
    "check_layout",
    "layout_payload_len",
    "decode",
    "encode",
    "encode_header",
    "new_checksum",
    "parse_header",
    "payload_checksum",
    "read_header",
    "try_decode",
]

MAGIC = b"LMKV"
CHUNK_FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sHHIIQQIIHHH")
FIXED_HEADER_BYTES = _FIXED.size  # enough of a header to learn its full length
_ALIGN = 64
_MAX_HEADER = 64 << 10


class CorruptChunk(ValueError):
    """Bytes that are not a valid chunk for what the reader asked (a miss, never a load)."""


@dataclass(frozen=True)
class Namespace:
    """Which chunks may share storage: one model and one pool row layout (the key alone does not say)."""

    model: str
    signature: bytes

    @property
    def tag(self) -> str:
        """A short, filesystem-safe name of the namespace (directory names)."""
        ident = b"%d/%d/" % (FORMAT_VERSION, CHUNK_FORMAT_VERSION)
        ident += len(self.model.encode()).to_bytes(4, "little") + self.model.encode() + self.signature
        return blake3.blake3(ident).hexdigest()[:16]

    @property
    def remote_prefix(self) -> str:
        """Key prefix in Redis/Valkey: format versions, model and layout, readable in ``redis-cli``."""
        return f"lmcache:v{FORMAT_VERSION}.{CHUNK_FORMAT_VERSION}:{self.model}:{self.signature.decode()}:"


@dataclass(frozen=True)
class ChunkHeader:
    key: ChunkKey
    model: str
    signature: bytes
    num_tokens: int
    payload_len: int
    checksum: int
    header_len: int

    @property
    def total_len(self) -> int:
        return self.header_len + self.payload_len


def payload_checksum(payload: object) -> int:
    """xxh3_64 of a bytes-like object (memoryview, numpy array, bytes); releases the GIL."""
    return xxhash.xxh3_64_intdigest(payload)


def new_checksum() -> xxhash.xxh3_64:
    """A streaming payload checksum (``update`` piece by piece, then ``intdigest()``): hashing each
    piece right after reading it, while it is still in the CPU cache, saves a pass over memory."""
    return xxhash.xxh3_64()


def _as_bytes_view(data: object) -> memoryview:
    if isinstance(data, np.ndarray):
        data = data.reshape(-1).view(np.uint8)
    view = memoryview(data)  # type: ignore[arg-type]
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def encode_header(
    key: ChunkKey, namespace: Namespace, num_tokens: int, payload: object, checksum: int | None = None
) -> bytes:
    """The header for ``payload`` (its checksum is computed unless given)."""
    view = _as_bytes_view(payload)
    if checksum is None:
        checksum = payload_checksum(view)
    model = namespace.model.encode()
    variable = key.chunk_hash + namespace.signature + model
    body_len = _FIXED.size + len(variable)
    header_len = -(-(body_len + 8) // _ALIGN) * _ALIGN
    body = _FIXED.pack(
        MAGIC,
        CHUNK_FORMAT_VERSION,
        FORMAT_VERSION,
        header_len,
        num_tokens,
        view.nbytes,
        checksum,
        key.world_size,
        key.rank,
        len(key.chunk_hash),
        len(namespace.signature),
        len(model),
    )
    body += variable + bytes(header_len - 8 - body_len)
    return body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")


def encode(key: ChunkKey, namespace: Namespace, num_tokens: int, payload: object) -> bytes:
    """Header and payload as one bytes object (one copy of the payload)."""
    view = _as_bytes_view(payload)
    return b"".join((encode_header(key, namespace, num_tokens, view), view))


def header_length(prefix: bytes | memoryview) -> int:
    """The full header length announced by the first ``_FIXED.size`` bytes."""
    if len(prefix) < _FIXED.size:
        raise CorruptChunk(f"truncated header ({len(prefix)} bytes)")
    magic, fmt, keyfmt, header_len = struct.unpack_from("<4sHHI", prefix)
    if magic != MAGIC:
        raise CorruptChunk(f"bad magic {bytes(magic)!r}")
    if fmt != CHUNK_FORMAT_VERSION or keyfmt != FORMAT_VERSION:
        raise CorruptChunk(f"format version {fmt}/{keyfmt}, expected {CHUNK_FORMAT_VERSION}/{FORMAT_VERSION}")
    if header_len % _ALIGN or not _FIXED.size + 8 <= header_len <= _MAX_HEADER:
        raise CorruptChunk(f"bad header length {header_len}")
    return header_len


def parse_header(data: bytes | memoryview) -> ChunkHeader:
    """Parse and verify a header (magic, versions, lengths, header checksum); the payload is not read."""
    view = memoryview(data)
    header_len = header_length(view[: _FIXED.size])
    if len(view) < header_len:
        raise CorruptChunk(f"truncated header ({len(view)} of {header_len} bytes)")
    body = view[: header_len - 8]
    stored = int.from_bytes(view[header_len - 8 : header_len], "little")
    if xxhash.xxh3_64_intdigest(body) != stored:
        raise CorruptChunk("header checksum mismatch")
    (_, _, _, _, num_tokens, payload_len, checksum, world_size, rank, hash_len, sig_len, model_len) = (
        _FIXED.unpack_from(view)
    )
    start = _FIXED.size
    if start + hash_len + sig_len + model_len > header_len - 8:
        raise CorruptChunk("header fields overflow the header")
    chunk_hash = bytes(view[start : start + hash_len])
    signature = bytes(view[start + hash_len : start + hash_len + sig_len])
    model_bytes = bytes(view[start + hash_len + sig_len : start + hash_len + sig_len + model_len])
    try:
        model = model_bytes.decode()
    except UnicodeDecodeError:
        raise CorruptChunk("model name is not UTF-8") from None
    return ChunkHeader(
        ChunkKey(chunk_hash, world_size, rank),
        model,
        signature,
        num_tokens,
        payload_len,
        checksum,
        header_len,
    )


def read_header(f: BinaryIO) -> ChunkHeader:
    """Read and verify the header at the current position of a binary file (an unbuffered one may
    return fewer bytes than asked for: only the end of the file makes a header truncated)."""
    prefix = _read_exact(f, _FIXED.size)
    header_len = header_length(prefix)
    return parse_header(prefix + _read_exact(f, header_len - len(prefix)))


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """``n`` bytes, or fewer only at the end of the file."""
    data = f.read(n)
    while 0 < len(data) < n:
        more = f.read(n - len(data))
        if not more:
            break
        data += more
    return data


_ITEMSIZE = {
    "float64": 8,
    "int64": 8,
    "float32": 4,
    "int32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
_SIGNATURE = re.compile(rb"^([a-z0-9_]+)/L(\d+)/KV(\d+)/E(\d+)/T(\d+)$")


def layout_payload_len(signature: bytes, num_tokens: int) -> int | None:
    """Bytes of a chunk of ``num_tokens`` tokens in the layout ``signature`` names
    (:meth:`lmcache.layout.PoolLayout.signature`); None if the signature is not of that form."""
    match = _SIGNATURE.match(signature)
    if match is None or match.group(1).decode() not in _ITEMSIZE:
        return None
    layers, kv, elems, tokens_per_block = (int(g) for g in match.groups()[1:])
    if tokens_per_block == 0:
        return None
    return (num_tokens // tokens_per_block) * layers * kv * elems * _ITEMSIZE[match.group(1).decode()]


def check_header(
    header: ChunkHeader, key: ChunkKey | None, namespace: Namespace | None, payload_len: int | None = None
) -> None:
    """Raise :class:`CorruptChunk` unless the header is for ``key`` in ``namespace`` (None = any)."""
    if key is not None and header.key != key:
        raise CorruptChunk(f"chunk is for key {header.key.hex()}, expected {key.hex()}")
    if namespace is not None and (header.signature, header.model) != (namespace.signature, namespace.model):
        raise CorruptChunk(
            f"chunk is for {header.model!r} {header.signature!r}, expected "
            f"{namespace.model!r} {namespace.signature!r}"
        )
    if payload_len is not None and header.payload_len != payload_len:
        raise CorruptChunk(f"payload is {header.payload_len} bytes, expected {payload_len}")


def check_layout(header: ChunkHeader) -> None:
    """Raise :class:`CorruptChunk` unless the payload length is what the header's layout signature
    gives for its token count (signatures not of :func:`layout_payload_len`'s form are not checked)."""
    expected = layout_payload_len(header.signature, header.num_tokens)
    if expected is not None and (header.num_tokens <= 0 or header.payload_len != expected):
        raise CorruptChunk(
            f"payload of {header.payload_len} bytes for {header.num_tokens} tokens does not match the "
            f"layout ({expected} bytes)"
        )


def decode(
    data: bytes | memoryview, key: ChunkKey | None = None, namespace: Namespace | None = None
) -> tuple[ChunkHeader, memoryview]:
    """Verify ``data`` completely and return its header and a zero-copy view of the payload."""
    view = memoryview(data)
    header = parse_header(view)
    check_header(header, key, namespace)
    if len(view) != header.total_len:
        raise CorruptChunk(f"chunk is {len(view)} bytes, header says {header.total_len}")
    payload = view[header.header_len :]
    if payload_checksum(payload) != header.checksum:
        raise CorruptChunk("payload checksum mismatch")
    return header, payload


def try_decode(
    data: bytes | memoryview | None, key: ChunkKey | None = None, namespace: Namespace | None = None
) -> tuple[ChunkHeader, memoryview] | None:
    """``decode``, with None for missing or corrupt data."""
    if data is None:
        return None
    try:
        return decode(data, key, namespace)
    except CorruptChunk:
        return None
