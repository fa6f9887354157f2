"""The errors a :class:`~lmcache.server.client.CacheServerClient` call raises: no answer in time
(:class:`ServerUnavailable`), or an error reply (:class:`ServerError`, a subclass per code); and
:func:`reply_value`, a reply's value or its error raised."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from lmcache.server import protocol as P

T = TypeVar("T")

__all__ = [
    "BadPool",
    "InvalidRequest",
    "LimitExceeded",
    "ServerError",
    "ServerUnavailable",
    "RegistrationRefused",
    "SettingsMismatch",
    "Unauthorized",
    "UnknownInstance",
    "VersionMismatch",
    "error_for",
    "reply_value",
    "timed_out",
]


class ServerUnavailable(ConnectionError):
    """The server did not answer in time (not running, restarting, unreachable or stuck)."""


class ServerError(RuntimeError):
    """The server answered with an error; ``code`` is a :class:`protocol.ErrorCode` value."""

    def __init__(self, code: str, message: str, op: str = "") -> None:
        super().__init__(f"{op + ': ' if op else ''}{message} [{code}]")
        self.code = code
        self.message = message
        self.op = op


class UnknownInstance(ServerError):
    pass


class VersionMismatch(ServerError):
    pass


class BadPool(ServerError):
    pass


class InvalidRequest(ServerError):
    pass


class RegistrationRefused(ServerError):
    """Raised by the client itself: re-registering an instance with a server that restarted was refused
    as invalid (e.g. its L1 cannot hold one chunk of the pool); the server's message says what to change.
    Nothing goes through the instance until a server takes it (the next call or heartbeat asks again)."""


class SettingsMismatch(ServerError):
    """Raised by the client itself, never answered by a server: the server registered the instance
    with another chunk size than the one it was registered for (``register(..., chunk_size=)``), so
    nothing is looked up, stored or loaded through it until a server with that chunk size registers
    it again (a restart: the heartbeat or the next call re-registers it)."""

    CODE = "settings_mismatch"

    def __init__(self, op: str, server_chunk_size: int, chunk_size: int) -> None:
        super().__init__(
            self.CODE,
            f"the cache server uses chunk size {server_chunk_size} (its --chunk-size) but this pool was "
            f"registered for chunks of {chunk_size} tokens; the pool is not used until they match",
            op,
        )
        self.server_chunk_size = server_chunk_size
        self.chunk_size = chunk_size


class Unauthorized(ServerError):
    """The server refused the client's credentials (secret, uid, or an instance's capability)."""


class LimitExceeded(ServerError):
    """A resource cap of the server refused the request; the message names the cap."""


_BY_CODE: dict[str, type[ServerError]] = {
    P.ErrorCode.UNKNOWN_INSTANCE.value: UnknownInstance,
    P.ErrorCode.VERSION_MISMATCH.value: VersionMismatch,
    P.ErrorCode.BAD_POOL.value: BadPool,
    P.ErrorCode.INVALID.value: InvalidRequest,
    P.ErrorCode.UNAUTHORIZED.value: Unauthorized,
    P.ErrorCode.LIMIT.value: LimitExceeded,
}


def error_for(error: P.ErrorInfo, op: str) -> ServerError:
    """The exception for an error reply of ``op``."""
    return _BY_CODE.get(error.code, ServerError)(error.code, error.message, op)


def timed_out(url: str, op: str, timeout: float) -> ServerUnavailable:
    return ServerUnavailable(
        f"no reply to {op} from the cache server at {url} within {timeout:g} s; is it running? "
        "(start it with: python -m lmcache.v1.multiprocess.server)"
    )


def reply_value(reply: P.Reply, result_type: type[T], op: str) -> T:
    """The value of ``op``'s reply as ``result_type``; an error reply raised."""
    if reply.v != P.PROTOCOL_VERSION:
        raise VersionMismatch(
            P.ErrorCode.VERSION_MISMATCH.value,
            f"server replied with protocol v{reply.v}, this client speaks v{P.PROTOCOL_VERSION}; "
            "install the same lmcache release on both sides",
            op,
        )
    if not reply.ok:
        err = reply.error or P.ErrorInfo(P.ErrorCode.INTERNAL.value, "error reply without details")
        raise error_for(err, op)
    try:
        return msgspec.convert(reply.value, result_type)
    except msgspec.ValidationError as e:
        raise ServerError(P.ErrorCode.INTERNAL.value, f"unexpected reply value: {e}", op) from None
