"""What the server's layers share about failures: the typed failure a service method raises (it
carries the :class:`protocol.ErrorCode` of the error reply) and the counters behind ``stats`` and
``/metrics`` (requests, error replies, reaped instances, refusals by reason)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmcache.server import protocol as P

__all__ = ["ServiceFailure", "ServerCounters"]


class ServiceFailure(Exception):
    """A request the server refuses; ``code`` becomes the error reply's code, the message its text
    (it names what was wrong and what to do)."""

    def __init__(self, code: P.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ServerCounters:
    """Totals since start; any thread updates them (a lost increment under a race is harmless)."""

    requests: int = 0
    errors: int = 0
    """Error replies sent."""
    reaped: int = 0
    """Instances dropped for silence."""
    refusals: dict[str, int] = field(default_factory=dict)
    """Requests refused by the security checks and resource caps, by reason."""

    def refuse(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
