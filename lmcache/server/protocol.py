"""Wire protocol between the cache server and its clients.

Transport: plain stream sockets at the seed's URLs (``tcp://host:port``: TCP, ``ipc:///path``: a
Unix socket), carrying frames, each behind its length as a 4-byte little-endian unsigned int
(:data:`FRAME_HEADER`). A client holds a small pool of connections (lanes) and has one request in
flight per connection, waited for in the calling thread. Every message is one frame holding one
msgpack-encoded msgspec struct:

* a request is one member of the :data:`Request` tagged union (tag field ``op``), carrying the
  protocol version ``v``, a client-chosen request id ``rid`` and, optionally, ``timeout_ms``
  (the server skips requests that waited longer than that before they could start, so a
  request its client already gave up on never touches the client's KV pool);
* the answer is a :class:`Reply` echoing ``rid``, with either ``value`` (per-op type, below) or
  an :class:`ErrorInfo` (``code`` from :class:`ErrorCode`, and a message saying what was wrong
  and what to do).

``v`` is checked on every message, in both directions. Credentials (see ``docs/security.md``): a
request over TCP carries the server secret in ``auth`` (Unix-socket peers are known by their
``SO_PEERCRED`` instead); every request naming an instance carries the instance's ``cap``, the
unguessable capability its ``register`` returned (:attr:`RegisterInfo.cap`). Pool descriptors
(:data:`PoolDescriptor`, tag field ``kind``) name the memory a client shares with the server;
see :mod:`lmcache.server.pool_sharing`.

=============  ===============================================  ==============================
op             request fields                                    reply value
=============  ===============================================  ==============================
register       instance_id rank world_size model_name            :class:`RegisterInfo`
               tokens_per_block pool
unregister     instance_id                                       bool (was registered)
lookup         instance_id tokens cache_salt pin_id              int: hit tokens (all ranks)
lookup_hashes  instance_id chunk_hashes num_tokens pin_id        int: hit tokens (all ranks); none
               claims claimed_at one_way                         if ``one_way`` (a claimed hit)
release        instance_id pin_id pin_owner                      bool (pins were held)
store          instance_id tokens cache_salt block_ids           int: tokens newly stored
               start end chunk_hashes after_event
retrieve       instance_id tokens cache_salt block_ids           int: tokens loaded
               start end pin_id pin_owner chunk_hashes after_event
heartbeat      instance_ids                                      :class:`HeartbeatInfo`
ping           one_way (a wake-up: no reply)                     :class:`PingInfo`
stats          (none)                                            :class:`StatsInfo`
clear          (none)                                            int: chunks dropped
store_reserve  instance_id tokens cache_salt start end           :class:`StoreSlots`
               chunk_hashes                                      (shared-L1 pools)
store_done     instance_id ticket ok                             int: tokens published
load           instance_id tokens cache_salt start end           :class:`LoadSlots`
               chunk_hashes pin_id pin_owner
load_done      instance_id ticket                                bool (ticket was open)
abandon        instance_id rids                                  int: replies given back; none if
                                                                 ``one_way``
l1_slabs       (none)                                            :class:`SlabList`
=============  ===============================================  ==============================
"""

from __future__ import annotations

import enum
import struct
from typing import Annotated, Any, get_args

import msgspec
from msgspec import Meta

from lmcache.server.pool_descriptors import (
    MAX_FORWARD_EVENTS,
    SHARING_MODES,
    CpuShmPool,
    CudaIpcPool,
    NonNeg,
    PoolDescriptor,
    SharedL1Pool,
    sharing_mode,
)
from lmcache.server.session_protocol import ChunkHashing, HeartbeatInfo, PingInfo, RegisterInfo
from lmcache.server.shared_l1_protocol import (
    ClaimRegions,
    LeasedSlot,
    LoadChunk,
    LoadSlots,
    LookupSlots,
    RegionInfo,
    SlabInfo,
    SlabList,
    SlotInfo,
    StoreChunk,
    StoreSlots,
)
from lmcache.server.stats_protocol import InstanceStats, StatsInfo
from lmcache.server.wire_ids import TOKEN_BYTES, WireIds, ids_from_wire, tokens_to_bytes, wire_id_count

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_FRAME_BYTES",
    "MAX_FORWARD_EVENTS",
    "MAX_LEASE",
    "TOKEN_BYTES",
    "ErrorCode",
    "ErrorInfo",
    "Reply",
    "Request",
    "REQUEST_TYPES",
    "OPS",
    "Register",
    "Unregister",
    "Lookup",
    "LookupHashes",
    "Release",
    "Store",
    "Retrieve",
    "Heartbeat",
    "Ping",
    "Stats",
    "Clear",
    "CpuShmPool",
    "CudaIpcPool",
    "SharedL1Pool",
    "PoolDescriptor",
    "SHARING_MODES",
    "sharing_mode",
    "StoreReserve",
    "StoreDone",
    "Load",
    "LoadDone",
    "Abandon",
    "L1Slabs",
    "SlabList",
    "SlabInfo",
    "SlotInfo",
    "StoreChunk",
    "LoadChunk",
    "LeasedSlot",
    "StoreSlots",
    "LoadSlots",
    "LookupSlots",
    "RegisterInfo",
    "ClaimRegions",
    "RegionInfo",
    "ChunkHashing",
    "FRAME_HEADER",
    "PingInfo",
    "HeartbeatInfo",
    "StatsInfo",
    "InstanceStats",
    "encode",
    "decode_reply",
    "tokens_to_bytes",
    "ids_from_wire",
    "wire_id_count",
    "WireIds",
]

PROTOCOL_VERSION = 14
"""Bumped on any incompatible change; client and server must agree exactly."""

MAX_FRAME_BYTES = 64 << 20
"""Default cap of one request frame (the server answers larger ones with an error)."""

FRAME_HEADER = struct.Struct("<I")
"""What precedes each frame on a connection: the frame's length in bytes."""

MAX_TOKENS = 1 << 22
MAX_BLOCKS = 1 << 22
MAX_WORLD_SIZE = 4096
MAX_NAME = 512
MAX_SALT = 4096
MAX_LEASE = 4096
"""Most leased slots one request may ask for or name."""
MAX_ABANDONED = 64
"""Most request ids one ``abandon`` names."""

MAX_LIST_IDS = 1 << 16
"""Most ids a request may send as a msgpack list: the server's I/O thread decodes every frame, and a list
costs it an object per id (bytes cost a copy); longer prompts and block lists travel as bytes."""

UInt63 = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
RequestId = Annotated[int, Meta(ge=1, le=(1 << 63) - 1)]
"""A request's ``rid`` as a client numbers them, from 1 (0: not numbered)."""
TokenIds = (
    Annotated[memoryview, Meta(max_length=8 * MAX_TOKENS)]
    | Annotated[list[int], Meta(max_length=MAX_LIST_IDS)]
)
"""Token ids: little-endian int64 bytes (fast path, see :func:`tokens_to_bytes`) or a short list. The
bytes decode as a view into the frame: the server's I/O thread copies no prompt."""
ChunkHashBytes = Annotated[bytes, Meta(max_length=8 * MAX_TOKENS)]
"""The digests of a prompt's full chunks, in order, concatenated (see :class:`ChunkHashing`)."""
BlockIds = (
    Annotated[memoryview, Meta(max_length=8 * MAX_BLOCKS)]
    | Annotated[list[int], Meta(max_length=MAX_LIST_IDS)]
)
"""Pool block ids: little-endian int64 bytes (decoded as a view into the frame) or a short list."""
Salt = Annotated[str, Meta(max_length=MAX_SALT)] | int | None
PinId = Annotated[str, Meta(max_length=MAX_NAME)] | int | None
Cap = Annotated[bytes, Meta(max_length=64)] | None
"""An instance's capability (:attr:`RegisterInfo.cap`)."""


class ErrorCode(str, enum.Enum):
    MALFORMED = "malformed"
    VERSION_MISMATCH = "version_mismatch"
    UNKNOWN_OP = "unknown_op"
    INVALID = "invalid"
    UNKNOWN_INSTANCE = "unknown_instance"
    BAD_POOL = "bad_pool"
    TOO_LARGE = "too_large"
    EXPIRED = "expired"
    UNAUTHORIZED = "unauthorized"
    LIMIT = "limit"
    """A resource cap of the server (see ``docs/security.md``) refused the request."""
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


# ---- requests -----------------------------------------------------------------------------------


class _Req(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True):
    v: int = PROTOCOL_VERSION
    rid: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] = 0
    timeout_ms: Annotated[int, Meta(ge=0, lt=1 << 40)] | None = None
    auth: Annotated[bytes, Meta(max_length=256)] | None = None
    """The server secret (TCP peers); ignored on Unix sockets, whose peers are known by uid."""


class Register(_Req, tag="register", kw_only=True):
    instance_id: UInt63
    rank: NonNeg
    world_size: Annotated[int, Meta(ge=1, le=MAX_WORLD_SIZE)]
    model_name: Annotated[str, Meta(min_length=1, max_length=MAX_NAME)]
    tokens_per_block: Annotated[int, Meta(ge=1, le=1 << 20)]
    pool: PoolDescriptor
    cap: Cap = None
    """The current registration's capability, to refresh it or replace its pool (none for a new id)."""


class Unregister(_Req, tag="unregister", kw_only=True):
    instance_id: UInt63
    cap: Cap = None


class Lookup(_Req, tag="lookup", kw_only=True):
    instance_id: UInt63
    tokens: TokenIds
    cache_salt: Salt = None
    pin_id: PinId = None
    cap: Cap = None
    slots: bool = False
    """With ``pin_id``: answer a :class:`LookupSlots` naming the pinned chunks' slots (shared-L1)."""


class LookupHashes(_Req, tag="lookup_hashes", kw_only=True):
    """A lookup by the prompt's full-chunk hashes (the salt folded in), computed by the client as the
    server would (:class:`ChunkHashing`): no hashing on the server. ``slots`` as in :class:`Lookup`."""

    instance_id: UInt63
    chunk_hashes: ChunkHashBytes
    num_tokens: Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
    """The prompt's length: ``chunk_hashes`` must hold exactly ``num_tokens // chunk_size`` digests."""
    pin_id: PinId = None
    cap: Cap = None
    slots: bool = False
    claims: Annotated[bytes, Meta(max_length=4 * MAX_TOKENS)] = b""
    """Index entries the client claimed for this hit (uint32 each): given back once it is pinned."""
    claimed_at: Annotated[float, Meta(ge=0.0)] = 0.0
    """With ``claims``: when the client claimed, by ``time.monotonic()`` (claims need one host's clock)."""
    one_way: bool = False


class Release(_Req, tag="release", kw_only=True):
    instance_id: UInt63
    pin_id: Annotated[str, Meta(max_length=MAX_NAME)] | int
    pin_owner: UInt63 | None = None
    """Instance whose lookup took the pins (default: ``instance_id``)."""
    cap: Cap = None


class Store(_Req, tag="store", kw_only=True):
    """Save the prompt's chunks in ``[start, end)`` from ``block_ids``. The prompt is ``tokens``, or,
    with ``tokens`` empty, ``chunk_hashes`` (the salt folded in, as for ``lookup_hashes``)."""

    instance_id: UInt63
    tokens: TokenIds
    cache_salt: Salt = None
    block_ids: BlockIds
    start: NonNeg = 0
    end: NonNeg
    chunk_hashes: ChunkHashBytes | None = None
    cap: Cap = None
    after_event: Annotated[int, Meta(ge=0, lt=MAX_FORWARD_EVENTS)] | None = None
    """An exported CUDA pool's: the forward event (of its descriptor's) to copy after, else done."""


class Retrieve(_Req, tag="retrieve", kw_only=True):
    """Load tokens ``[start, end)`` into ``block_ids``; the prompt is named as in :class:`Store`."""

    instance_id: UInt63
    tokens: TokenIds
    cache_salt: Salt = None
    block_ids: BlockIds
    start: NonNeg = 0
    end: NonNeg
    chunk_hashes: ChunkHashBytes | None = None
    pin_id: PinId = None
    pin_owner: UInt63 | None = None
    """Instance whose lookup took the pins (default: ``instance_id``); ranks of one TP world pass
    the scheduler's instance id, and the pins go once every rank retrieved or on ``release``."""
    cap: Cap = None
    after_event: Annotated[int, Meta(ge=0, lt=MAX_FORWARD_EVENTS)] | None = None
    """An exported CUDA pool's: the forward event (of its descriptor's) recorded after the work on the
    stream that reads the blocks next; the copies start once it completed, else at once."""


class Heartbeat(_Req, tag="heartbeat", kw_only=True):
    instance_ids: Annotated[list[UInt63], Meta(max_length=4096)] = []
    caps: Annotated[list[Annotated[bytes, Meta(max_length=64)]], Meta(max_length=4096)] = []
    """``caps[i]`` is the capability of ``instance_ids[i]``; an id without its own counts as unknown."""
    missed_lookups: Annotated[int, Meta(ge=0, le=1 << 32)] = 0
    missed_tokens: Annotated[int, Meta(ge=0, le=1 << 48)] = 0
    """Lookups the client found missing in the presence counts since its last heartbeat (no request
    reached the server), and their tokens: counted as the server's own, for its hit rate."""


class Ping(_Req, tag="ping", kw_only=True):
    one_way: bool = False
    """A wake-up, not answered: sent ahead of a request the client still prepares (hashes a prompt for)."""


class Stats(_Req, tag="stats", kw_only=True):
    pass


class Clear(_Req, tag="clear", kw_only=True):
    pass


class StoreReserve(_Req, tag="store_reserve", kw_only=True):
    """Shared-L1 store, step 1: reserve L1 slots for the prompt's chunks in ``[start, end)`` (named as
    in :class:`Store`); the reply is :class:`StoreSlots`. No block ids: the worker copies itself.
    ``lease``: also add up to that many full-chunk slots to the instance's lease (capped; ``start ==
    end`` only tops it up); ``filling``: leased slots this store fills, out of the cap until its report."""

    instance_id: UInt63
    tokens: TokenIds
    cache_salt: Salt = None
    start: NonNeg = 0
    end: NonNeg
    chunk_hashes: ChunkHashBytes | None = None
    lease: Annotated[int, Meta(ge=0, le=MAX_LEASE)] = 0
    filling: Annotated[list[UInt63], Meta(max_length=MAX_LEASE)] = []
    cap: Cap = None


class StoreDone(_Req, tag="store_done", kw_only=True):
    """Shared-L1 store, step 2: the worker's copies into the ticket's slots (``ticket`` 0: none) and
    into the leased slots ``leases`` are complete (``ok``), so the chunks are published; ``ok=False``
    gives the slots back. ``leases[i]`` holds chunk ``i`` of the leased range ``[start, end)`` of the
    prompt (named as in :class:`Store`); a chunk already cached frees its slot. Every leased slot
    named leaves the lease. Reply: int, tokens published; none if ``one_way``."""

    instance_id: UInt63
    ticket: UInt63 = 0
    ok: bool = True
    leases: Annotated[list[UInt63], Meta(max_length=MAX_LEASE)] = []
    tokens: TokenIds = b""
    cache_salt: Salt = None
    start: NonNeg = 0
    end: NonNeg = 0
    """``start + len(leases) * chunk_size``."""
    chunk_hashes: ChunkHashBytes | None = None
    one_way: bool = False
    """No reply, not even an error (the server logs it): the worker goes on as soon as it is sent;
    its later requests on the same connection are served after it."""
    cap: Cap = None


class Load(_Req, tag="load", kw_only=True):
    """Shared-L1 load, step 1: pin the chunks of ``[start, end)`` (named as in :class:`Retrieve`,
    stopping at the first not cached); reply :class:`LoadSlots`, in two parts (the first with
    ``more``) when there are more than ``first`` chunks: the first ``first`` chunks, then the rest,
    under one ticket. The lookup's pins (``pin_id``) may go once the reply is sent: the load holds its
    own until :class:`LoadDone`."""

    instance_id: UInt63
    tokens: TokenIds
    cache_salt: Salt = None
    start: NonNeg = 0
    end: NonNeg
    chunk_hashes: ChunkHashBytes | None = None
    pin_id: PinId = None
    pin_owner: UInt63 | None = None
    first: Annotated[int, Meta(ge=0, le=MAX_LEASE)] = 0
    cap: Cap = None


class LoadDone(_Req, tag="load_done", kw_only=True):
    """Shared-L1 load, step 2: the worker has copied out of the ticket's slots; they are unpinned.
    Reply: bool (the ticket was open); none if ``one_way`` (as for :class:`StoreDone`)."""

    instance_id: UInt63
    ticket: UInt63
    one_way: bool = False
    cap: Cap = None


class Abandon(_Req, tag="abandon", kw_only=True):
    """Shared-L1: the client never read the replies to its ``store_reserve`` or ``load`` requests
    ``rids`` (its call timed out or its connection broke first), so it will never report them done:
    what they granted (a ticket's reservation or pins, leased slots) goes back now, not with the
    registration. A reply not sent yet grants nothing once abandoned. Reply: int, the replies whose
    grants went back; none if ``one_way``."""

    instance_id: UInt63
    rids: Annotated[list[RequestId], Meta(min_length=1, max_length=MAX_ABANDONED)]
    one_way: bool = False
    cap: Cap = None


class L1Slabs(_Req, tag="l1_slabs", kw_only=True):
    """The server's L1 slabs in shared memory, for a worker to map and page-lock before it registers
    a pool in the shared-L1 mode (reply :class:`SlabList`; empty slabs from a server that exports)."""


Request = (
    Register
    | Unregister
    | Lookup
    | LookupHashes
    | Release
    | Store
    | Retrieve
    | Heartbeat
    | Ping
    | Stats
    | Clear
    | StoreReserve
    | StoreDone
    | Load
    | LoadDone
    | Abandon
    | L1Slabs
)
REQUEST_TYPES: tuple[type[_Req], ...] = get_args(Request)
OPS: dict[str, type[_Req]] = {t.__struct_config__.tag: t for t in REQUEST_TYPES}


# ---- replies ------------------------------------------------------------------------------------


class ErrorInfo(msgspec.Struct):
    code: str
    message: str


class Reply(msgspec.Struct, kw_only=True):
    v: int = PROTOCOL_VERSION
    rid: int
    """The request's ``rid``; -1 when the request was too broken to read one from."""
    ok: bool
    value: Any = None
    error: ErrorInfo | None = None
    more: bool = False
    """A first part of the answer: another reply to the same request follows (shared-L1 ``load``
    sends the slots of its first chunks ahead of the rest, so the worker's copies start early)."""


# ---- encoding -----------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()


_reply_decoder = msgspec.msgpack.Decoder(Reply)


class _Header(msgspec.Struct):
    """The fields read before the full decode, to answer even requests that fail it; left encoded (a
    client may put any structure there: an empty map is one byte on the wire, a dict in memory)."""

    v: msgspec.Raw = msgspec.Raw()
    rid: msgspec.Raw = msgspec.Raw()
    op: msgspec.Raw = msgspec.Raw()
    one_way: msgspec.Raw = msgspec.Raw()


_header_decoder = msgspec.msgpack.Decoder(_Header)
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError)
"""What decoding a frame raises on bad input (ValueError: bad UTF-8)."""
_scalar_decoder = msgspec.msgpack.Decoder(int | float | str | bool | None)


def _scalar(field: msgspec.Raw) -> int | float | str | bool | None:
    """A header field's value if a scalar of at most 64 encoded bytes (longer than any version, rid or
    op name, short enough to quote); None if it is absent, longer or a structure."""
    try:
        return _scalar_decoder.decode(field) if 0 < len(field) <= 64 else None
    except _DECODE_ERRORS:
        return None


_request_decoder = msgspec.msgpack.Decoder(Request)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_reply(frame: bytes | bytearray) -> Reply:
    return _reply_decoder.decode(frame)


class ProtocolError(Exception):
    """A request frame the server cannot serve; carries the reply's error code and rid, and whether
    the frame said it is ``one_way`` (its sender reads no reply, not even this error)."""

    def __init__(self, code: ErrorCode, message: str, rid: int = -1, one_way: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.rid = rid
        self.one_way = one_way


def decode_request(frame: bytes | bytearray, max_bytes: int = MAX_FRAME_BYTES) -> Request:
    """Decode and validate one request frame, or raise :class:`ProtocolError` (also for a frame nested
    too deeply to decode: one short log line each, never a traceback)."""
    if len(frame) <= max_bytes:
        try:
            req: Request = _request_decoder.decode(frame)
        except _DECODE_ERRORS:
            pass  # read it again below, field by field, to say what is wrong
        else:
            if req.v == PROTOCOL_VERSION:
                return req
    header: _Header | None = None
    malformed: Exception | None = None
    try:
        header = _header_decoder.decode(frame)  # skips the values of other fields: cheap even when big
    except _DECODE_ERRORS as e:
        malformed = e
    version, rid, op, one_way = (
        (_scalar(header.v), _scalar(header.rid), _scalar(header.op), _scalar(header.one_way) is True)
        if header is not None
        else (None, None, None, False)  # one_way: its sender reads no reply
    )
    if not (type(rid) is int and 0 <= rid < 1 << 63):
        rid = -1
    if len(frame) > max_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"request frame of {len(frame)} bytes exceeds the server's limit of {max_bytes} bytes; "
            "send fewer tokens per request or raise the server's --max-frame-mb",
            rid,  # when readable, so the client matches the error to its request
            one_way,
        )
    if header is None:
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"malformed request frame ({malformed}); expected one msgpack map per frame, sent by "
            "lmcache.server.client.CacheServerClient",
        )
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.VERSION_MISMATCH,
            f"protocol version mismatch: client sent v={version!r}, server speaks v={PROTOCOL_VERSION}; "
            "install the same lmcache release for the client (TRT-LLM process) and the server",
            rid,
            one_way,
        )
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(
            ErrorCode.UNKNOWN_OP,
            f"unknown op {op!r}; this server (protocol v{PROTOCOL_VERSION}) knows: " + ", ".join(OPS),
            rid,
            one_way,
        )
    try:
        return _request_decoder.decode(frame)
    except _DECODE_ERRORS as e:
        raise ProtocolError(ErrorCode.INVALID, f"invalid {op!r} request: {e}", rid, one_way) from None
