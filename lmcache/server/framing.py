"""Framing shared by the server and the client.

A message is one msgpack-encoded frame (:mod:`lmcache.server.protocol`); on a connection (a plain
stream socket) each frame travels behind its length, a 4-byte little-endian unsigned int
(:data:`HEADER`). :class:`FrameBuffer` cuts a byte stream back into
frames. Size caps: requests beyond ``max_frame_bytes`` get a ``too_large`` reply, a peer that
announces more than :func:`hard_frame_cap` is disconnected; a client refuses replies announcing
more than :data:`MAX_REPLY_BYTES`.
"""

from __future__ import annotations

import msgspec

from lmcache.server import protocol as P

__all__ = [
    "HEADER",
    "MAX_REPLY_BYTES",
    "REPLY_DECODE_ERRORS",
    "FrameBuffer",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "error_reply",
    "framed",
    "hard_frame_cap",
]

HEADER = P.FRAME_HEADER
MAX_REPLY_BYTES = 2 * P.MAX_FRAME_BYTES
REPLY_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, ValueError)
"""What :func:`decode_reply` raises for bytes that are not a reply."""

encode_request = P.encode
decode_request = P.decode_request
decode_reply = P.decode_reply


def hard_frame_cap(max_frame_bytes: int) -> int:
    """Peers announcing more are disconnected; frames between ``max_frame_bytes`` and this get an
    error reply (see :func:`protocol.decode_request`)."""
    return 2 * max_frame_bytes + (1 << 20)


def framed(payload: bytes) -> bytes:
    """``payload`` behind its length, as a connection carries it."""
    return HEADER.pack(len(payload)) + payload


def error_reply(rid: int, code: P.ErrorCode, message: str) -> P.Reply:
    return P.Reply(rid=rid, ok=False, error=P.ErrorInfo(code.value, message))


def encode_reply(reply: P.Reply) -> bytes:
    """The reply's frame; a value that cannot be encoded becomes an ``internal`` error reply."""
    try:
        return P.encode(reply)
    except (TypeError, msgspec.EncodeError) as e:
        return P.encode(error_reply(reply.rid, P.ErrorCode.INTERNAL, f"{e}"))


Frame = bytes | bytearray
"""One frame's payload as :class:`FrameBuffer` hands it over."""


class FrameBuffer:
    """Bytes received on a stream, cut into frames."""

    def __init__(self) -> None:
        self._data = bytearray()

    def __bool__(self) -> bool:
        """Whether part of a frame is waiting."""
        return bool(self._data)

    def feed(self, data: bytes) -> None:
        self._data += data

    def announced(self) -> int | None:
        """The size the next frame announced (None: its header is not complete yet)."""
        if len(self._data) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(self._data)
        return size

    def pop(self) -> Frame | None:
        """The next frame, if it is complete: the buffer itself when it holds just that frame (a
        large frame is never copied), else a copy of its bytes."""
        size = self.announced()
        if size is None or len(self._data) < HEADER.size + size:
            return None
        if len(self._data) == HEADER.size + size:
            frame, self._data = self._data, bytearray()
            del frame[: HEADER.size]
            return frame
        with memoryview(self._data) as view:
            frame = bytes(view[HEADER.size : HEADER.size + size])
        del self._data[: HEADER.size + size]
        return frame
