"""RESP (the Redis protocol) pieces the remote tier needs beyond redis-py: a command packer that never
joins large arguments, and a reply reader that puts chunk values straight into L1 buffers.

:class:`ZeroCopyPacker` sends a chunk's header and its L1 payload as separate buffers, so a chunk goes
from pinned host memory to the socket without a copy. :class:`RespReader` reads an ``MGET`` reply off
the socket: small items through a buffer, payloads with ``recv_into`` into the caller's buffers,
verified against their header and checksum as they arrive.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from lmcache.keys import ChunkKey
from lmcache.storage.chunk_format import (
    FIXED_HEADER_BYTES,
    CorruptChunk,
    Namespace,
    check_header,
    check_layout,
    header_length,
    new_checksum,
    parse_header,
)
from lmcache.storage.lower_tier import FetchStatus, Sink

__all__ = ["Parts", "RespReader", "ZeroCopyPacker", "protocol_error"]

_CUTOFF = 6000  # arguments longer than this are sent as their own buffer, never joined
_READ_SIZE = 1 << 16
_RECV_PIECE = 256 << 10


class Parts:
    """A command argument made of several buffers, sent back to back without being joined."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = [memoryview(p).cast("B") if not isinstance(p, bytes) else p for p in parts]
        self.nbytes = sum(len(p) for p in self.parts)


class ZeroCopyPacker:
    """RESP command packer that keeps large arguments (and :class:`Parts`) as separate buffers.

    redis-py sends the list it returns item by item (``sendall``), and its pipeline packing keeps
    large items separate, so payloads are never copied into one big ``bytes``. (redis-py's hiredis
    packer, its default when hiredis is installed, copies every argument twice.)
    """

    def pack(self, *args: Any) -> list[Any]:
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        out: list[Any] = []
        buf = b"*%d\r\n" % len(args)
        for arg in args:
            if isinstance(arg, Parts):
                out.append(buf + b"$%d\r\n" % arg.nbytes)
                out.extend(arg.parts)
                buf = b"\r\n"
                continue
            if isinstance(arg, str):
                arg = arg.encode()
            elif isinstance(arg, bool):
                raise TypeError("refusing to send a bool to Redis")
            elif isinstance(arg, (int, float)):
                arg = repr(arg).encode()
            elif isinstance(arg, (bytearray, memoryview)):
                arg = memoryview(arg).cast("B")
            size = len(arg)
            if size > _CUTOFF or isinstance(arg, memoryview):
                out.append(buf + b"$%d\r\n" % size)
                out.append(arg)
                buf = b"\r\n"
            else:
                buf += b"$%d\r\n%s\r\n" % (size, arg)
        out.append(buf)
        return out


def protocol_error(msg: str) -> Exception:
    """redis-py's ``ResponseError`` (a reply we cannot parse; the connection must be dropped)."""
    from redis.exceptions import ResponseError

    return ResponseError(msg)


def _closed(what: str) -> Exception:
    from redis.exceptions import ConnectionError as RedisConnectionError

    return RedisConnectionError(f"connection closed by the server while reading {what}")


class RespReader:
    """Reads one RESP2/RESP3 reply off a socket (anything with ``recv`` and ``recv_into``; also
    ``settimeout`` when given a ``deadline``: a ``time.monotonic()`` instant by which the whole reply
    must have arrived, else ``TimeoutError``)."""

    def __init__(self, sock: Any, deadline: float | None = None) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()
        self.pos = 0

    def _arm(self) -> None:
        """Bound the next receive by what is left until the deadline."""
        if self.deadline is None:
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the reply did not arrive in full within the timeout")
        self.sock.settimeout(left)

    def _fill(self) -> None:
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self._arm()
        data = self.sock.recv(_READ_SIZE)
        if not data:
            raise _closed("a reply")
        self.buf += data

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                out = bytes(self.buf[self.pos : end])
                self.pos = end + 2
                return out
            self._fill()

    def read(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            self._fill()
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def read_into(self, out: memoryview, checksum: Any = None) -> None:
        """Fill ``out`` (buffered bytes first, then ``recv_into``), feeding ``checksum`` as it goes."""
        buffered = min(len(self.buf) - self.pos, out.nbytes)
        if buffered:
            out[:buffered] = self.buf[self.pos : self.pos + buffered]
            self.pos += buffered
            if checksum is not None:
                checksum.update(out[:buffered])
        got = buffered
        while got < out.nbytes:
            self._arm()
            n = self.sock.recv_into(out[got : got + _RECV_PIECE])
            if not n:
                raise _closed("a value")
            if checksum is not None:
                checksum.update(out[got : got + n])
            got += n

    def skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n:
            step = min(n, scratch.nbytes)
            self.read_into(scratch[:step])
            n -= step

    def array_header(self) -> int:
        """The element count of an array reply; an error reply is raised."""
        head = self.line()
        if head.startswith(b"-"):
            raise protocol_error(head[1:].decode(errors="replace"))
        if not head.startswith(b"*"):
            raise protocol_error(f"expected an array reply, got {head[:40]!r}")
        return int(head[1:])

    def chunk_value(self, index: int, key: ChunkKey, ns: Namespace, sink: Sink) -> FetchStatus:
        """Read one bulk string holding a chunk of ``key``: its payload into ``sink``'s buffer."""
        head = self.line()
        if head == b"_":  # RESP3 null
            return FetchStatus.MISSING
        if not head.startswith(b"$"):
            raise protocol_error(f"expected a bulk string, got {head[:40]!r}")
        length = int(head[1:])
        if length < 0:
            return FetchStatus.MISSING
        status = self._chunk_body(index, key, ns, sink, length)
        if self.read(2) != b"\r\n":
            raise protocol_error("bulk string not terminated by CRLF")
        return status

    def _chunk_body(self, index: int, key: ChunkKey, ns: Namespace, sink: Sink, length: int) -> FetchStatus:
        if length < FIXED_HEADER_BYTES:
            self.skip(length)
            return FetchStatus.CORRUPT
        prefix = self.read(FIXED_HEADER_BYTES)
        consumed = FIXED_HEADER_BYTES
        try:
            header_len = header_length(prefix)
            if header_len > length:
                raise CorruptChunk("value shorter than its header")
            rest = self.read(header_len - FIXED_HEADER_BYTES)
            consumed = header_len
            header = parse_header(prefix + rest)
            check_header(header, key, ns)
            check_layout(header)
            if header.total_len != length:
                raise CorruptChunk("value length does not match its header")
        except CorruptChunk:
            self.skip(length - consumed)
            return FetchStatus.CORRUPT
        out = sink(index, header.payload_len, header.num_tokens)
        if out is None or out.nbytes != header.payload_len:
            self.skip(header.payload_len)
            return FetchStatus.SKIPPED
        checksum = new_checksum()
        self.read_into(out, checksum)
        return FetchStatus.OK if checksum.intdigest() == header.checksum else FetchStatus.CORRUPT
