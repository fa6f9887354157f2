"""The cache server's dispatch: from a received frame to a reply handed to the transport.

:meth:`Dispatcher.on_frames` (called by the I/O thread with the frames of one poll round) decodes
each frame, checks the sender (:class:`Admission`), notes the liveness of the instances it names,
and serves each request (first the frames of the connections that sent a one-way report in the
round, each connection's frames in arrival order):

* answers ``ping`` and ``heartbeat`` at once (liveness never waits behind the client's queue);
* runs inline, on the I/O thread, the cheap metadata ops (``stats``; ``release``, the shared-L1
  reports ``store_done`` and ``load_done``, and ``lookup``, ``lookup_hashes`` or shared-L1
  ``load`` when there is no lower tier to read, each only when its real cost, known before it
  runs, fits :data:`~lmcache.server.inline_cost.INLINE_MAX_COST`: see
  :mod:`lmcache.server.inline_cost`), but only when nothing of the same connection is queued or
  running, so per-connection order is kept exactly; this saves two thread hand-offs;
* queues everything else on the connection's serial queue, run by the worker pool: requests of
  one connection run one at a time in arrival order, different connections in parallel.

A one-way request (``one_way``: ``store_done``, ``load_done``, ``abandon``, ``ping``, a claimed
``lookup_hashes``) gets no reply, not even an error, which is logged instead: its client reads none,
so a reply would be read as the answer to its next request on that connection. That holds for a
frame that fails to decode or validate too, once its header says ``one_way``; only a frame without a
readable header is answered rid -1 (never sent by this package's client). It keeps its place in its
connection's order like any other. A client reports a save done (and TRT-LLM learns of it) once its
report is sent, and a report sent before a request on another connection is read in the same poll
round as that request or an earlier one: served first, and inline when nothing of its connection
waits and its cost fits the budget (a ticket of a few thousand chunks, or leased chunks deep into a
long prompt, do not), it is published before that request looks.

A handler may leave work for after its reply (:meth:`Call.after_reply
<lmcache.server.calls.Call.after_reply>`): the worker posts the reply, then runs it, before the
connection's next request. Replies go to a :class:`ReplySink` (the transport).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.server import framing
from lmcache.server import protocol as P
from lmcache.server.calls import Call
from lmcache.server.failures import ServiceFailure
from lmcache.server.inline_cost import InlineCosts
from lmcache.server.pool_sharing import PoolSharingError
from lmcache.server.security import Peer, PeerPolicy, group_id, secret_matches
from lmcache.server.service import CacheService
from lmcache.server.settings import ServerConfig
from lmcache.server.shared_l1 import SharedL1Error

logger = init_logger(__name__)

__all__ = [
    "Admission",
    "Dispatcher",
    "Identity",
    "ReplySink",
    "MAX_QUEUED_PER_CLIENT",
]

MAX_QUEUED_PER_CLIENT = 4096
DRAIN_BURST = 16
"""Requests a worker runs from one queue before letting other connections' queues run."""

Identity = int
"""A client connection's number (one lane of a client)."""


class ReplySink(Protocol):
    def post(self, identity: Identity, reply: P.Reply) -> None:
        """Send ``reply`` to the connection (any thread); dropped if the connection is gone."""


class Admission:
    """Who may send what (``docs/security.md``): ``ping`` is open to all; Unix-socket peers must pass
    the uid policy, TCP peers carry the server secret; ``stats`` and ``clear`` are the operator's."""

    def __init__(self, config: ServerConfig) -> None:
        groups = set(config.allowed_groups)
        if config.socket_group:
            groups.add(group_id(config.socket_group))
        self.policy = PeerPolicy(frozenset(config.allowed_uids), frozenset(groups))
        self.secret: bytes | None = config.secret
        """The secret TCP requests must carry (loaded at start when not configured)."""

    def proves(self, peer: Peer, req: Any) -> bool:
        """Whether ``req`` came over TCP with the server secret (a ``ping`` too): its connection is then
        no longer an unproven one (:mod:`lmcache.server.transport`). Unix peers were checked as they
        connected and are never unproven, so nothing is checked for them again here."""
        return not peer.is_unix and secret_matches(self.secret, req.auth)

    def refusal(self, peer: Peer, req: Any) -> str | None:
        """Why ``peer`` may not send ``req`` (None: it may)."""
        if isinstance(req, P.Ping):
            return None
        if peer.is_unix:
            if not self.policy.allows(peer):
                return f"uid {peer.uid} is not allowed to use this server (see --allow-uid / --socket-group)"
        elif not secret_matches(self.secret, req.auth):
            return (
                "TCP requests must carry this server's secret: run the client as the server's user (it reads "
                "~/.lmcache/server_secret) or set LMCACHE_SERVER_SECRET"
            )
        if isinstance(req, (P.Stats, P.Clear)) and not self.policy.is_operator(peer):
            return f"{type(req).__name__.lower()} is an operator operation (the server's own user or root)"
        return None


class Dispatcher:
    """Orders and runs the requests of every connection; see the module docstring."""

    def __init__(
        self, service: CacheService, config: ServerConfig, admission: Admission, stopping: threading.Event
    ) -> None:
        self.service = service
        self.config = config
        self.admission = admission
        self.counters = service.counters
        self.stopping = stopping
        """Set when the server stops: queued requests are then answered ``shutting_down``, except
        one-way reports, which still run."""
        self.sink: ReplySink | None = None
        self._executor = ThreadPoolExecutor(max(1, config.max_workers), thread_name_prefix="lmcache-worker")
        self._forward_waits = {
            op: ThreadPoolExecutor(
                max(1, config.max_workers), thread_name_prefix=f"lmcache-forward-{op.__name__}"
            )
            for op in (P.Store, P.Retrieve)
        }
        """Run the stores, and the loads, that wait for a worker's forward first (``after_event``): a
        long wait never holds a thread that lookups need, and a load never waits behind a store's."""
        self._gone: set[Identity] = set()
        """Connections closed while a request of theirs was queued or running: what those requests
        wait for is given up (:meth:`Call.expiring`), their replies could not be delivered."""
        self._queues: dict[Identity, deque[tuple[Any, float, Peer, int]]] = {}
        self._queued_bytes: dict[Identity, int] = {}
        """Frame bytes of each connection's queued requests (``_queues``), counted against
        :attr:`queue_cap` per connection and ``max_pending_bytes`` all together."""
        self.queue_cap = config.max_pending_bytes_per_connection or framing.hard_frame_cap(
            config.max_frame_bytes
        )
        """Bytes of requests one connection may have waiting: one frame of the largest size it may send."""
        self._running: set[Identity] = set()
        self._lock = threading.Lock()
        self._busy_until = 0.0
        self._one_way_failures = RateLimitedLog(logger)
        self.inline_types: set[type] = {P.Stats}
        """Message types the I/O thread always runs itself when nothing of their connection waits
        (pure metadata work of bounded cost); a new handler group may add its own."""
        self.costs = InlineCosts(service)
        """What the other ops would cost the I/O thread: those within the budget run there."""

    def bind(self, sink: ReplySink) -> None:
        """Where replies go (the transport, built after the dispatcher)."""
        self.sink = sink

    def busy_poll(self, now: float) -> bool:
        """Whether the I/O thread should poll without sleeping: within ``busy_poll_s`` of a request,
        and never while a worker runs (the two would fight for the GIL)."""
        return not self._running and now < self._busy_until

    def waiting(self, identity: Identity | None = None) -> int:
        """Requests of ``identity`` (None: of every connection) received and waiting behind the one
        their worker runs."""
        with self._lock:
            if identity is None:
                return sum(len(q) for q in self._queues.values())
            return len(self._queues.get(identity, ()))

    def shutdown(self) -> None:
        """Finish the running and queued requests (once stopping, all but one-way reports are answered
        ``shutting_down``)."""
        self._executor.shutdown(wait=True)
        for executor in self._forward_waits.values():
            executor.shutdown(wait=True)

    def closed(self, identity: Identity) -> None:
        """The connection ``identity`` is gone (I/O thread)."""
        with self._lock:
            if identity in self._running:
                self._gone.add(identity)

    def _post(self, identity: Identity, reply: P.Reply) -> None:
        assert self.sink is not None, "Dispatcher.bind(sink) first"
        self.sink.post(identity, reply)

    def refuse(self, identity: Identity, req: Any, code: P.ErrorCode, message: str) -> None:
        """Answer ``req`` with an error without running it."""
        self.counters.errors += 1
        logger.debug("request %d refused (%s): %s", req.rid, code.value, message)
        self.answer(identity, req, framing.error_reply(req.rid, code, message))

    def answer(self, identity: Identity, req: Any, reply: P.Reply) -> None:
        """Send ``req``'s reply, unless ``req`` is one-way: its failure is then logged instead (the
        client reads no reply)."""
        if not getattr(req, "one_way", False):
            self._post(identity, reply)
        elif not reply.ok and reply.error is not None:
            self._one_way_failed(type(req).__name__, identity, reply.error.code, reply.error.message)

    def _one_way_failed(self, what: str, identity: Identity, code: str, message: str) -> None:
        """Log the failure of a one-way request: its client reads no reply, an error would answer the
        client's next request on that connection instead."""
        self._one_way_failures.warning(
            f"one-way-{code}", "one-way %s from connection %d failed (%s): %s", what, identity, code, message
        )

    def _parts(self, identity: Identity, req: Any) -> Callable[[Any], None]:
        """Sends a first part of ``req``'s reply (see :attr:`Call.send_part`)."""
        return lambda value: self.answer(identity, req, P.Reply(rid=req.rid, ok=True, value=value, more=True))

    def reply_error(self, identity: Identity, rid: int, code: P.ErrorCode, message: str) -> None:
        self.counters.errors += 1
        logger.debug("request %d refused (%s): %s", rid, code.value, message)
        self._post(identity, framing.error_reply(rid, code, message))

    # ---- the I/O thread -------------------------------------------------------------------------

    def on_frames(self, frames: list[tuple[Identity, framing.Frame, Peer]]) -> set[Identity]:
        """Serve the request frames of one poll round (I/O thread): first those of the connections that
        sent a one-way report in it, then the others', each connection's in arrival order; never
        raises. Returns the connections whose requests proved their sender (:meth:`Admission.proves`)."""
        received: list[tuple[Identity, Any, Peer, float, int]] = []
        reporting: set[Identity] = set()
        proven: set[Identity] = set()
        for identity, frame, peer in frames:
            with self._guard(identity):
                req = self._decode(identity, frame)
            if req is None:
                continue
            with self._guard(identity, req):
                if self.admission.proves(peer, req):
                    proven.add(identity)
                if self._admit(identity, req, peer):
                    received.append((identity, req, peer, time.monotonic(), len(frame)))
                    if getattr(req, "one_way", False):
                        reporting.add(identity)
        first = [r for r in received if r[0] in reporting]
        for identity, req, peer, arrived, nbytes in first + [r for r in received if r[0] not in reporting]:
            with self._guard(identity, req):
                self._on_request(identity, req, peer, arrived, nbytes)
        return proven

    @contextlib.contextmanager
    def _guard(self, identity: Identity, req: Any = None) -> Iterator[None]:
        """Never let one request take the I/O thread down: an internal error is answered instead, as
        ``req``'s error (none for a one-way request); rid -1 while no request was decoded."""
        try:
            yield
        except Exception as e:
            logger.exception("internal error serving a request")
            message = f"internal server error: {type(e).__name__}"
            if req is None:
                self.reply_error(identity, -1, P.ErrorCode.INTERNAL, message)
            else:
                self.counters.errors += 1
                self.answer(identity, req, framing.error_reply(req.rid, P.ErrorCode.INTERNAL, message))

    def _decode(self, identity: Identity, frame: framing.Frame) -> Any | None:
        """The frame's request; None when it cannot be served (answered already, unless one-way)."""
        self.counters.requests += 1
        self._busy_until = time.monotonic() + self.config.busy_poll_s
        try:
            return framing.decode_request(frame, self.config.max_frame_bytes)
        except P.ProtocolError as e:
            if e.one_way:
                self.counters.errors += 1
                self._one_way_failed(f"request (rid {e.rid})", identity, e.code.value, str(e))
            else:
                self.reply_error(identity, e.rid, e.code, str(e))
            return None

    def _admit(self, identity: Identity, req: Any, peer: Peer) -> bool:
        """Whether ``req``'s sender is admitted (its instances then noted alive); refused, it was
        answered (unless one-way)."""
        now = time.monotonic()
        refused = self.admission.refusal(peer, req)
        if refused is not None:
            self.counters.refuse("unauthorized")
            self.refuse(identity, req, P.ErrorCode.UNAUTHORIZED, refused)
            return False
        self.service.touch(req, now)
        return True

    def _on_request(self, identity: Identity, req: Any, peer: Peer, now: float, nbytes: int) -> None:
        if isinstance(req, (P.Ping, P.Heartbeat)):  # liveness: never behind the client's queue
            self.answer(identity, req, self.execute(req, now, Call(peer)))
            return
        inline = self.inline(req)
        with self._lock:
            if inline and identity not in self._running:
                q = None  # nothing of this connection is queued or running: answering now keeps order
            else:
                q = self._queues.setdefault(identity, deque())
                if len(q) >= MAX_QUEUED_PER_CLIENT:
                    self.counters.refuse("queue")
                    message = f"more than {len(q)} requests queued; slow down"
                    self.refuse(identity, req, P.ErrorCode.LIMIT, message)
                    return
                refused = self._queue_bytes_refusal(identity, nbytes)
                if refused is not None:
                    self.counters.refuse("queued_bytes")
                    self.refuse(identity, req, P.ErrorCode.LIMIT, refused)
                    return
                q.append((req, now, peer, nbytes))
                self._queued_bytes[identity] = self._queued_bytes.get(identity, 0) + nbytes
                if identity in self._running:
                    return
                self._running.add(identity)
        if q is None:
            self.answer(
                identity, req, self.execute(req, now, Call(peer, send_part=self._parts(identity, req)))
            )
            return
        self._submit_drain(identity, self._executor_for(req))

    def _executor_for(self, req: Any) -> ThreadPoolExecutor:
        """The threads that run ``req``: a store or load waiting for its worker's forward runs on
        threads of its own op (:attr:`_forward_waits`), everything else on the general workers."""
        if getattr(req, "after_event", None) is not None:
            return self._forward_waits[type(req)]
        return self._executor

    def _submit_drain(self, identity: Identity, executor: ThreadPoolExecutor) -> None:
        """Have ``executor`` run ``identity``'s queue (its queue's requests answered ``shutting_down``
        if the executor no longer takes work)."""
        try:
            executor.submit(self._drain, identity, executor)
        except RuntimeError:  # shutting down
            self._answer_rest(identity)

    def _queue_bytes_refusal(self, identity: Identity, nbytes: int) -> str | None:
        """Why a request of ``nbytes`` may not wait in ``identity``'s queue (lock held); None: it may."""
        mine = self._queued_bytes.get(identity, 0)
        if mine and mine + nbytes > self.queue_cap:
            return (
                f"this connection has {mine} bytes of requests waiting already (cap {self.queue_cap}, "
                "--max-frame-mb); wait for their replies before sending more"
            )
        total = sum(self._queued_bytes.values())
        if total and total + nbytes > self.config.max_pending_bytes:
            return (
                f"the server has {total} bytes of requests waiting (cap {self.config.max_pending_bytes}, "
                "--max-pending-mb); retry shortly"
            )
        return None

    def inline(self, req: Any) -> bool:
        """Whether the I/O thread may run ``req`` itself: pure metadata work whose cost, counted from
        the request's fields and the server's counts before it runs, fits the budget (see
        :mod:`lmcache.server.inline_cost`)."""
        # stats: in order, after the cleanups of earlier calls
        return type(req) in self.inline_types or self.costs.runs_inline(req)

    # ---- workers --------------------------------------------------------------------------------

    def _drain(self, identity: Identity, executor: ThreadPoolExecutor) -> None:
        """Run ``identity``'s queued requests in order on this thread of ``executor``; a request that
        belongs on other threads (:meth:`_executor_for`) hands the rest of the queue to them."""
        for _ in range(DRAIN_BURST):
            with self._lock:
                q = self._queues.get(identity)
                if not q:
                    self._running.discard(identity)
                    self._gone.discard(identity)
                    self._queues.pop(identity, None)
                    self._queued_bytes.pop(identity, None)
                    return
                moved = self._executor_for(q[0][0])
                if moved is self._executor or moved is executor:
                    moved = None
                    req, received, peer, nbytes = q.popleft()
                    self._queued_bytes[identity] -= nbytes
            if moved is not None:  # a wait for a forward never holds a general worker
                self._submit_drain(identity, moved)
                return
            reply: P.Reply | None
            # A one-way report still runs: it finishes what the client did (copies into L1 slots).
            if self.stopping.is_set() and not getattr(req, "one_way", False):
                reply = framing.error_reply(req.rid, P.ErrorCode.SHUTTING_DOWN, "the server is shutting down")
            else:
                gone = None if getattr(req, "one_way", False) else functools.partial(self._is_gone, identity)
                call = Call(peer, cleanups=[], send_part=self._parts(identity, req), gone=gone)
                reply = self.execute(req, received, call)
                if call.cleanups:
                    # The client's next request waits in this queue until the cleanup is done.
                    self.answer(identity, req, reply)
                    _run_cleanups(call.cleanups)
                    reply = None
            with self._lock:
                # Done before a reply without cleanups goes out: the client's next request may then
                # run inline.
                done = not self._queues.get(identity)
                if done:
                    self._running.discard(identity)
                    self._gone.discard(identity)
                    self._queues.pop(identity, None)
                    self._queued_bytes.pop(identity, None)
            if reply is not None:
                self.answer(identity, req, reply)
            if done:
                return
        self._submit_drain(identity, self._executor)  # other clients' queues run first, then this one

    def _is_gone(self, identity: Identity) -> bool:
        return identity in self._gone

    def _answer_rest(self, identity: Identity) -> None:
        """The executor is shutting down: answer what is left in this connection's queue."""
        with self._lock:
            q = self._queues.pop(identity, deque())
            self._queued_bytes.pop(identity, None)
            self._running.discard(identity)
        for req, _, _, _ in q:
            self.refuse(identity, req, P.ErrorCode.SHUTTING_DOWN, "the server is shutting down")

    def execute(self, req: Any, received: float, call: Call) -> P.Reply:
        """Run ``req`` through the service: its reply, an error reply for a failure, or ``expired`` if
        it waited longer than its ``timeout_ms``."""
        if req.timeout_ms and (time.monotonic() - received) * 1000 > req.timeout_ms:
            self.counters.errors += 1
            return framing.error_reply(
                req.rid,
                P.ErrorCode.EXPIRED,
                f"request waited longer than its timeout_ms={req.timeout_ms} and was not run",
            )
        call.set_timeout(received, req.timeout_ms)
        try:
            return P.Reply(rid=req.rid, ok=True, value=self.service.handle(req, call))
        except ServiceFailure as e:
            code, message = e.code, str(e)
        except SharedL1Error as e:
            code, message = e.code, f"{type(req).__name__.lower()}: {e}"
        except PoolSharingError as e:
            code, message = P.ErrorCode.BAD_POOL, str(e)
        except (ValueError, IndexError) as e:
            code, message = P.ErrorCode.INVALID, f"{type(req).__name__.lower()}: {e}"
        except Exception as e:
            logger.exception("internal error serving %s", type(req).__name__)
            code, message = P.ErrorCode.INTERNAL, f"internal server error: {type(e).__name__}"
        self.counters.errors += 1
        logger.debug("request %d (%s) failed (%s): %s", req.rid, type(req).__name__, code.value, message)
        return framing.error_reply(req.rid, code, message)


def _run_cleanups(cleanups: list[Callable[[], None]]) -> None:
    for cleanup in cleanups:
        try:
            cleanup()
        except Exception:
            logger.exception("cleanup after a reply")
