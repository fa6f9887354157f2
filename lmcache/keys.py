"""Chunk keys: a prefix-chained cryptographic hash over token ids.

``h_i = H(h_{i-1} || H(tokens of chunk i))``, the chain seeded by the format version, model name,
cache salt and pool layout signature. Keys are identical in every process and on every machine;
``PYTHONHASHSEED`` plays no part.

Each chunk's inner hash depends on that chunk alone, so a whole prompt's inner hashes are computed
side by side (in SIMD lanes, by ``lmcache._hashchain``); only the outer links, one 64-byte block
each with blake3, run one after another (see benchmarks/RESULTS.md, D31).
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import blake3
import numpy as np
import xxhash

from lmcache.logging import init_logger

if TYPE_CHECKING:
    import torch

try:
    # The chain over a Python list (or, for blake3, int64 bytes) in C (lmcache/_hashchain.c, built by
    # setup.py); optional, this module's pure-Python path is the fallback and the reference.
    from lmcache._hashchain import blake3_chain_bytes as _native_blake3_bytes
    from lmcache._hashchain import blake3_chain_digests as _native_blake3_chain
    from lmcache._hashchain import chain_digests as _native_chain
except ImportError:
    _native_chain = _native_blake3_chain = _native_blake3_bytes = None

logger = init_logger(__name__)
_told_pure = False


def native_chain() -> Callable[..., bytes] | None:
    """The C hash chain this module uses for lists of token ids (None: ``lmcache._hashchain`` is
    not built, and lists hash in Python)."""
    return _native_chain


FORMAT_VERSION = 2
"""The key scheme's version, in every key's seed and in stored chunks' headers. 2: inner hash per
chunk (1 hashed the parent and the chunk's tokens in one call)."""

HASH_ALGORITHMS: dict[str, Callable[[bytes], Any]] = {
    "blake3": blake3.blake3,
    "sha256": hashlib.sha256,
    # Fast, not collision-resistant: only for trusted single-tenant deployments.
    "xxh3_128": xxhash.xxh3_128,
}
"""Hash constructors, called as ``new(data).digest()``, no incremental ``update`` (the fastest form
from Python; see benchmarks/RESULTS.md, D15). blake3's chain runs natively where
``lmcache._hashchain`` is built."""

Tokens = Union[Sequence[int], np.ndarray, "torch.Tensor"]
CacheSalt = str | int | None


class ChunkKey(NamedTuple):
    """Where a chunk lives in storage: its content hash plus the rank slice of the KV it holds."""

    chunk_hash: bytes
    world_size: int
    rank: int

    def hex(self) -> str:
        return f"{self.chunk_hash.hex()}-w{self.world_size}r{self.rank}"


def chunk_keys(hashes: Iterable[bytes], world_size: int, rank: int) -> list[ChunkKey]:
    """``[ChunkKey(h, world_size, rank) for h in hashes]``, built by ``tuple.__new__``, which skips
    the namedtuple's Python-level ``__new__``: a lookup builds one key per chunk and rank, so this
    is on its hot path (see benchmarks/RESULTS.md, D15)."""
    return list(map(tuple.__new__, repeat(ChunkKey), zip(hashes, repeat(world_size), repeat(rank))))


def token_array(tokens: Tokens) -> np.ndarray:
    """Token ids as little-endian int64, converted in C (no per-token Python loop).

    Python lists (what TRT-LLM's ``get_tokens`` returns) go through ``struct``, which converts
    faster than numpy's per-element conversion (see benchmarks/RESULTS.md, D15).
    """
    if isinstance(tokens, list):
        try:
            # A fresh Struct packs a long list faster than struct.pack(fmt, ...) (RESULTS.md, D15).
            return np.frombuffer(struct.Struct(f"<{len(tokens)}q").pack(*tokens), dtype="<i8")
        except struct.error as exc:
            raise ValueError(f"token ids must be integers in int64 range: {exc}") from None
    torch = sys.modules.get("torch")  # a tensor exists only once torch is loaded; never load it here
    if torch is not None and isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens, dtype="<i8")
    if arr.ndim != 1:
        raise ValueError(f"token ids must be a flat sequence, got shape {arr.shape}")
    return arr


class ChunkHashes:
    """A prompt known by the hashes of its full chunks (:meth:`TokenHasher.chunk_hashes`, salt folded
    in) instead of by its token ids.

    A client that hashed a prompt for its lookup sends these digests with the prompt's loads and
    saves: 32 bytes per chunk instead of 8 per token, and no hashing on the server. Its length is the
    number of tokens the chunks cover.
    """

    __slots__ = ("hashes", "chunk_size")

    def __init__(self, hashes: Sequence[bytes], chunk_size: int) -> None:
        self.hashes = hashes
        self.chunk_size = chunk_size

    def __len__(self) -> int:
        return len(self.hashes) * self.chunk_size

    @classmethod
    def from_bytes(cls, data: bytes, digest_size: int, chunk_size: int) -> ChunkHashes:
        """Split concatenated digests (ValueError if ``data`` is not a whole number of them)."""
        if len(data) % digest_size:
            raise ValueError(
                f"chunk_hashes: {len(data)} bytes is not a whole number of {digest_size}-byte digests"
            )
        return cls([data[i : i + digest_size] for i in range(0, len(data), digest_size)], chunk_size)


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


def _salt_bytes(salt: CacheSalt) -> bytes:
    if salt is None:
        return b"-"
    if isinstance(salt, int):
        return b"i" + str(salt).encode()
    return b"s" + str(salt).encode()


def _say_pure_python() -> None:
    """Once per process: a deployment missing the C chain should know why its lookups are slower."""
    global _told_pure
    if not _told_pure:
        _told_pure = True
        logger.warning(
            "lmcache._hashchain is not built: prompts are hashed in pure Python, which makes every "
            "lookup slower (benchmarks/RESULTS.md, D15). Reinstall lmcache where a C compiler and the "
            "Python headers are present (pip install -e . builds it)."
        )


SEED_CACHE_SIZE = 4096
"""Salts whose chain seeds a :class:`TokenHasher` keeps (all are dropped when a new one would pass it)."""
SEED_CACHE_SALT_CHARS = 256
"""Longer string salts are hashed into a seed every time, never kept."""

NATIVE_GROUP_CHUNKS = 16
"""Chunks hashed per native call by :meth:`TokenHasher.iter_chunk_hashes`."""


class TokenHasher:
    """Turns token ids into chunk hashes for one key space (model, layout)."""

    def __init__(self, chunk_size: int, algorithm: str, model_name: str, layout_signature: bytes) -> None:
        if algorithm not in HASH_ALGORITHMS:
            raise ValueError(f"unknown hash algorithm {algorithm!r}; use one of {sorted(HASH_ALGORITHMS)}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.new_hash = HASH_ALGORITHMS[algorithm]
        """The hash constructor of ``algorithm`` (hashlib-style: ``new_hash(data).digest()``)."""
        self.algorithm = algorithm
        self.digest_size = len(self.new_hash(b"").digest())
        self._space = b"lmcache-trtllm" + _field(str(FORMAT_VERSION).encode()) + _field(model_name.encode())
        self._space += _field(layout_signature)
        self.scheme = _field(algorithm.encode()) + _field(str(chunk_size).encode()) + self._space
        """Everything that decides the hashes but the tokens and salt: equal schemes, equal hashes."""
        self._seeds: dict[tuple[type, CacheSalt], bytes] = {}

    def seed(self, salt: CacheSalt) -> bytes:
        """The chain's start for ``salt``: hashed once per salt and kept (a few tenants' salts in
        practice; at most :data:`SEED_CACHE_SIZE` of them), since a lookup after the host was busy elsewhere
        pays for every piece of code it runs (benchmarks/RESULTS.md, D72)."""
        kept = (type(salt), salt)  # by type too: 1 and True are one dict key, not one salt
        seed = self._seeds.get(kept)
        if seed is None:
            seed = self.new_hash(self._space + _field(_salt_bytes(salt))).digest()
            if not isinstance(salt, str) or len(salt) <= SEED_CACHE_SALT_CHARS:
                if len(self._seeds) >= SEED_CACHE_SIZE:
                    self._seeds.clear()
                self._seeds[kept] = seed
        return seed

    def chunk_hashes(self, tokens: Tokens, salt: CacheSalt = None) -> list[bytes]:
        """Hashes of every full chunk, in order."""
        digests = self._native_digests(tokens, salt)
        if digests is not None:
            size = self.digest_size
            return [digests[i : i + size] for i in range(0, len(digests), size)]
        return self.pure_chunk_hashes(tokens, salt)

    def chunk_digests(self, tokens: Tokens, salt: CacheSalt = None) -> bytes:
        """``b"".join(self.chunk_hashes(tokens, salt))``: the full chunks' digests, concatenated.

        A Python list is hashed in C when ``lmcache._hashchain`` is built (blake3 entirely in native
        code, D31).
        """
        digests = self._native_digests(tokens, salt)
        return digests if digests is not None else b"".join(self.pure_chunk_hashes(tokens, salt))

    def pure_chunk_hashes(self, tokens: Tokens, salt: CacheSalt) -> list[bytes]:
        """:meth:`chunk_hashes` in Python: the reference the C chain must match."""
        arr = token_array(tokens)
        return self._chain(arr, len(arr) // self.chunk_size, salt)

    def _native_digests(self, tokens: Tokens, salt: CacheSalt) -> bytes | None:
        """The concatenated digests from the C chain, or None where it does not apply (no extension;
        or not exactly a list, a subclass may iterate otherwise than its storage, unless blake3 hashes
        the tokens' int64 array: the cache server's tokens arrive as one)."""
        if _native_chain is None:
            _say_pure_python()
            return None
        if type(tokens) is not list:
            if self.algorithm != "blake3":
                return None
            data = self._int64_bytes(tokens)
            num_chunks = len(data) // 8 // self.chunk_size
            return _native_blake3_bytes(data, self.chunk_size, num_chunks, self.seed(salt))
        num_chunks = len(tokens) // self.chunk_size
        end = num_chunks * self.chunk_size
        if end < len(tokens):
            token_array(tokens[end:])  # the partial tail is not hashed, but must be valid as in the pure path
        return self._native_chain(tokens, num_chunks, self.seed(salt))

    def _native_chain(self, tokens: list[int], num_chunks: int, parent: bytes) -> bytes:
        """The hashes of the first ``num_chunks`` chunks of a token list chained after ``parent``
        (the seed, or the hash of the chunk before ``tokens[0]``), from the C chain, concatenated."""
        assert _native_chain is not None
        if self.algorithm == "blake3":
            return _native_blake3_chain(tokens, self.chunk_size, num_chunks, parent)
        return _native_chain(tokens, self.chunk_size, num_chunks, parent, self.new_hash)

    def link(self, parent: bytes, data: bytes | memoryview) -> bytes:
        """The hash chained after ``parent`` for a chunk whose token bytes are ``data``."""
        return self.new_hash(parent + self.new_hash(data).digest()).digest()

    def iter_chunk_hashes(
        self, tokens: Tokens, salt: CacheSalt = None, end: int | None = None
    ) -> Iterator[bytes]:
        """The hashes of :meth:`chunk_hashes` of ``tokens[:end]``, each converted and hashed only
        when asked for.

        A transfer starts copying its first chunk while later ones are still unhashed, instead of
        waiting for the whole prompt (see benchmarks/RESULTS.md, D4).
        """
        size = self.chunk_size
        end = len(tokens) if end is None else min(end, len(tokens))
        count = max(end, 0) // size
        parent = self.seed(salt)
        hashed = 0
        if type(tokens) is list and _native_chain is not None:
            try:
                groups = self._native_groups(
                    lambda first, group, after: self._native_chain(
                        tokens[first * size : (first + group) * size], group, after
                    ),
                    count,
                    parent,
                )
                for digest in groups:
                    parent, hashed = digest, hashed + size
                    yield digest
            except ValueError:
                pass  # a bad token: the Python path below raises, naming it
            else:
                return
        if isinstance(tokens, list):
            pack = struct.Struct(f"<{size}q").pack
            for begin in range(hashed, end // size * size, size):
                try:
                    data = pack(*tokens[begin : begin + size])
                except struct.error as exc:
                    raise ValueError(f"token ids must be integers in int64 range: {exc}") from None
                parent = self.link(parent, data)
                yield parent
            return
        data = self._int64_bytes(tokens[: count * size])
        step = size * 8
        if self.algorithm == "blake3" and _native_blake3_bytes is not None:
            yield from self._native_groups(
                lambda first, group, after: _native_blake3_bytes(
                    data[first * step : (first + group) * step], size, group, after
                ),
                count,
                parent,
            )
            return
        for begin in range(0, len(data), step):
            parent = self.link(parent, data[begin : begin + step])
            yield parent

    def _native_groups(
        self, chain: Callable[[int, int, bytes], bytes], count: int, parent: bytes
    ) -> Iterator[bytes]:
        """The hashes of chunks ``[0, count)`` from ``chain(first, group, parent)``, the concatenated
        hashes of ``group`` chunks from chunk ``first`` chained after ``parent``.

        A group of chunks per native call: far cheaper than hashing each in Python, and short enough
        that a saver holding the GIL for one never delays the executor for long. The first chunk goes
        alone: a lookup that misses it asks for nothing more.
        """
        step, first = self.digest_size, 0
        while first < count:
            group = min(NATIVE_GROUP_CHUNKS if first else 1, count - first)
            digests = chain(first, group, parent)
            for i in range(0, len(digests), step):
                yield digests[i : i + step]
            parent = digests[-step:]
            first += group

    @staticmethod
    def _int64_bytes(tokens: Tokens) -> memoryview:
        """The token ids as the key format's bytes (int64, little-endian), checked and read in place
        where they already are."""
        return memoryview(np.ascontiguousarray(token_array(tokens))).cast("B")

    def tail_hash(self, tokens: Tokens, salt: CacheSalt, prefix: bytes | None, start: int, end: int) -> bytes:
        """Hash of the partial chunk ``tokens[start:end]``, chained after the previous chunk's hash."""
        parent = prefix if prefix is not None else self.seed(salt)
        return self.link(parent, self._int64_bytes(tokens[start:end]))

    def _chain(self, arr: np.ndarray, num_chunks: int, salt: CacheSalt) -> list[bytes]:
        data = self._int64_bytes(arr[: num_chunks * self.chunk_size])
        step = self.chunk_size * 8
        parent = self.seed(salt)
        hashes = []
        for i in range(num_chunks):
            parent = self.link(parent, data[i * step : (i + 1) * step])
            hashes.append(parent)
        return hashes
