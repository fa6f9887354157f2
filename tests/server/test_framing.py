"""The framing both sides share: length-prefixed frames cut back out of a byte stream."""

from __future__ import annotations

from lmcache.server import framing
from lmcache.server import protocol as P


def test_frames_come_back_however_the_stream_is_cut() -> None:
    payloads = [b"", b"a", b"x" * 70_000, framing.encode_request(P.Ping(rid=3))]
    stream = b"".join(framing.framed(p) for p in payloads)
    for step in (1, 3, 4096, len(stream)):
        buffer = framing.FrameBuffer()
        got: list[bytes] = []
        for i in range(0, len(stream), step):
            buffer.feed(stream[i : i + step])
            while (frame := buffer.pop()) is not None:
                got.append(frame)
        assert got == payloads and not buffer


def test_announced_size_is_known_before_the_frame_is_complete() -> None:
    buffer = framing.FrameBuffer()
    buffer.feed(framing.HEADER.pack(1 << 31)[:3])
    assert buffer.announced() is None and buffer  # part of a header waits
    buffer.feed(framing.HEADER.pack(1 << 31)[3:])
    assert buffer.announced() == 1 << 31 and buffer.pop() is None
    assert framing.hard_frame_cap(P.MAX_FRAME_BYTES) < 1 << 31


def test_an_unencodable_reply_becomes_an_internal_error() -> None:
    reply = framing.decode_reply(framing.encode_reply(P.Reply(rid=5, ok=True, value=object())))
    assert reply.rid == 5 and not reply.ok and reply.error is not None
    assert reply.error.code == P.ErrorCode.INTERNAL.value


def test_a_frame_alone_in_the_buffer_is_handed_over_uncopied_and_stays_intact() -> None:
    """A large request frame reaches the decoder without a copy on the I/O thread; later bytes never
    write into a frame already handed over."""
    buffer = framing.FrameBuffer()
    buffer.feed(framing.framed(b"x" * 70_000))
    frame = buffer.pop()
    assert isinstance(frame, bytearray) and frame == b"x" * 70_000 and not buffer
    buffer.feed(framing.framed(b"y" * 10) + framing.framed(b"z"))
    assert buffer.pop() == b"y" * 10 and buffer.pop() == b"z" and buffer.pop() is None
    assert frame == b"x" * 70_000
