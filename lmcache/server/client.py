"""Client of the cache server: a small pool of plain-socket lanes, thread-safe, never hangs.

``CacheServerClient`` mirrors the server's ops as blocking methods. Any thread may call them. A
call takes a free lane (a connection to the server's URL, ``tcp://host:port`` or ``ipc:///path``),
opens one while the client holds fewer than ``lanes``, else waits for one; it sends its request and
waits for the reply in its own thread, with no hand-off between threads
(:mod:`lmcache.server.client_lanes`; benchmarks/RESULTS.md has what that saves). Heartbeats take a
lane like any call.

This module holds the ops, registration and re-registration, credentials and the error policy;
the lanes and the framing (:mod:`lmcache.server.framing`) live in their modules.

``lookup`` of an instance this client registered sends the prompt's chunk hashes, computed with
the key scheme the server announced at registration, instead of its tokens.

Ordering: a caller sends its next request only after the reply to the previous one, and takes the
lane it used last when that one is free, so the calls of one thread are served in the order it made
them. Calls of different threads that overlap in time run on different lanes and are not ordered: a
``lookup`` sent while another thread's ``store`` is still in flight may miss that store's chunks (it
does not wait behind it, which is what keeps lookups fast while a background thread saves).

Failure behaviour:

* No reply within ``timeout_s`` (server down, restarting or wedged) raises
  :class:`ServerUnavailable`, and the lane is closed (its reply is never delivered late). A call
  first connects if it has no open lane: a refused connect (server down) fails it at once. After a
  timeout, ``fail_fast`` calls give the server's address a brief connect (at most 50 ms) and fail at
  once if it does not answer, instead of each waiting ``timeout_s``; a restarted server is used by
  the next call (idle lanes to the old one are noticed closed and replaced).
* ``store`` and ``retrieve`` carry ``timeout_ms``: the server skips them if they could not start
  before the caller gave up, so a late retrieve never writes into blocks the caller has reused.
* An error reply raises :class:`ServerError` (or a subclass named after its code). When the server
  answers ``unknown_instance`` (it restarted, or reaped us) for an instance this client
  registered, the client registers that pool again by itself and retries the call once. The
  heartbeat thread does the same as soon as the server reports the instance unknown.
* Every ``heartbeat_interval_s`` the client sends a heartbeat for its instances, so an idle but
  alive client is never reaped.

Credentials (``docs/security.md``), all carried by the client itself: over TCP every request
carries the server secret (``secret``, else ``$LMCACHE_SERVER_SECRET``, else the secret file the
server created for this user); every request naming an instance carries the capability its
registration returned. Over ``ipc://`` the client refuses a socket owned by another user than
itself or root, and a connection served by a process of such a user.

CUDA pools: the caller must have finished writing the blocks before ``store`` (e.g. synchronize
the forward pass's stream); ``retrieve`` returns after the server's copies into the pool have
completed (see :mod:`lmcache.server.server`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from lmcache.keys import Tokens
from lmcache.logging import init_logger
from lmcache.server import framing
from lmcache.server import protocol as P
from lmcache.server.client_claims import ClaimedLookups
from lmcache.server.client_errors import (
    BadPool,
    InvalidRequest,
    LimitExceeded,
    RegistrationRefused,
    ServerError,
    ServerUnavailable,
    SettingsMismatch,
    Unauthorized,
    UnknownInstance,
    VersionMismatch,
    reply_value,
)
from lmcache.server.client_lanes import DEFAULT_LANES, Endpoint, LanePool, Submitted
from lmcache.server.client_registrations import Credentials, PromptHashes, Registration, Registrations
from lmcache.server.client_reregistration import (
    choose_again,
    log_registered_again,
    pool_descriptor,
    refused_as_such,
)
from lmcache.server.client_shared_l1 import SharedL1Transfers
from lmcache.transfer import BlockTransfer

if TYPE_CHECKING:  # torch and pool sharing load on first register: `lmcache stats` never imports torch
    import torch

    from lmcache.chunk_copy import CopyStart
    from lmcache.layered_load import LayerReady
    from lmcache.server.pool_sharing import RawCudaIPCWrapper

logger = init_logger(__name__)

__all__ = [
    "DEFAULT_SERVER_URL",
    "CacheServerClient",
    "PromptHashes",
    "ServerError",
    "ServerUnavailable",
    "SettingsMismatch",
    "RegistrationRefused",
    "UnknownInstance",
    "VersionMismatch",
    "BadPool",
    "InvalidRequest",
    "LimitExceeded",
    "Unauthorized",
    "new_instance_id",
    "normalize_url",
    "wait_for_server",
]

DEFAULT_SERVER_URL = "ipc:///tmp/lmcache.sock"
T = TypeVar("T")


def new_instance_id() -> int:
    """A random 63-bit instance id (not the pid: pids repeat across restarts and containers)."""
    return secrets.randbits(63) or 1


def normalize_url(url: str | None) -> str:
    """``url``, else ``$LMCACHE_SERVER_URL``, else ``ipc:///tmp/lmcache.sock``; bare ``host:port`` is TCP."""
    url = (url or os.environ.get("LMCACHE_SERVER_URL") or DEFAULT_SERVER_URL).strip()
    if "://" not in url:
        url = f"tcp://{url}"
    Endpoint.of(url)  # ValueError naming the URL and the accepted forms
    return url


class CacheServerClient:
    """Talks to one cache server over ``tcp://`` or ``ipc://``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout_s: float = 10.0,
        heartbeat_interval_s: float = 1.0,
        fail_fast: bool = True,
        secret: bytes | str | None = None,
        lanes: int = DEFAULT_LANES,
    ) -> None:
        """``secret``: the server secret for TCP (default: ``$LMCACHE_SERVER_SECRET``, else this user's
        secret file, see :mod:`lmcache.server.security`); ``lanes``: connections this client opens at
        most (calls of that many threads run at once, more wait for a lane)."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.url = normalize_url(url)
        self.credentials = Credentials(self.url, secret)
        self.timeout_s = timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.fail_fast = fail_fast
        self._rids = itertools.count(1)
        self._closed = False
        self.registrations = Registrations()
        self.instance_id: int | None = None
        self.server_id: str | None = None
        self.reregistrations = 0
        self._stop = threading.Event()
        self.lanes = LanePool(self.url, size=lanes, fail_fast=fail_fast)
        """The connections to the server; every call takes one."""
        # The stores and loads of pools it copies for itself.
        self.shared_l1 = SharedL1Transfers(self._call, self._submit, self._one_way, self.registrations)
        self.claimed = ClaimedLookups(self.registrations, self.shared_l1, self._frame, self.lanes)
        self._hb: threading.Thread | None = None
        if heartbeat_interval_s > 0:
            self._hb = threading.Thread(target=self._heartbeat_loop, name="lmcache-client-hb", daemon=True)
            self._hb.start()

    # ---- public API -----------------------------------------------------------------------------

    def ping(self, *, timeout_s: float | None = None) -> P.PingInfo:
        return self._call(P.Ping(), P.PingInfo, timeout_s)

    def wake(self, *, timeout_s: float | None = None) -> None:
        """A one-way ping: a server thread that slept wakes while this one prepares its next call."""
        with contextlib.suppress(ServerUnavailable):
            self._one_way(P.Ping(), timeout_s)()

    def register(
        self,
        pool: torch.Tensor | P.PoolDescriptor | RawCudaIPCWrapper,
        rank: int = 0,
        world_size: int = 1,
        model_name: str = "model",
        tokens_per_block: int = 32,
        *,
        instance_id: int | None = None,
        timeout_s: float | None = None,
        pool_sharing: str = "auto",
        chunk_size: int | None = None,
    ) -> P.RegisterInfo:
        """Share ``pool`` with the server; becomes this client's default instance. ``pool_sharing``
        (docs/multi-process.md): ``export`` (the server maps the pool: CPU after ``share_memory_()``,
        CUDA through raw IPC), ``shared-l1`` (this process copies, inside :meth:`store` and
        :meth:`retrieve`), ``auto`` (the server's forced mode, else export where possible). ``chunk_size``:
        the caller's; while the server's differs, the pool's calls raise :class:`SettingsMismatch`."""
        iid = new_instance_id() if instance_id is None else instance_id
        self.credentials.check_ipc_owner()
        reg = Registration(
            P.Register(
                instance_id=iid,
                rank=rank,
                world_size=world_size,
                model_name=model_name,
                tokens_per_block=tokens_per_block,
                pool=pool_descriptor(pool, pool_sharing, lambda: self.ping(timeout_s=timeout_s).pool_sharing),
            ),
            pool,
            policy=pool_sharing,
            chunk_size=chunk_size,
        )
        with self.registrations.registering:
            reg.copier = self.shared_l1.copier_for(reg)
            sent_at = self.registrations.clock()
            info = self._call(reg.request, P.RegisterInfo, timeout_s, retry_unknown=False)
            with self.registrations.lock:
                reg.update(info, sent_at)
                self.registrations.add(iid, reg)
                self.instance_id = iid
                self.server_id = info.server_id
        logger.info(
            "registered KV pool with the cache server at %s as instance %d (rank %d/%d, %s), sharing %s",
            self.url,
            iid,
            rank,
            world_size,
            model_name,
            reg.mode,
        )
        return info

    def unregister(self, instance_id: int | None = None, *, timeout_s: float | None = None) -> bool:
        iid = self._iid(instance_id)
        req = P.Unregister(instance_id=iid, cap=self.registrations.cap(iid) or None)
        with self.registrations.lock:
            other = self.registrations.pop(iid)
            if self.instance_id == iid:
                self.instance_id = other
        return self._call(req, bool, timeout_s, retry_unknown=False)

    def lookup(
        self,
        tokens: Any,
        cache_salt: str | int | None = None,
        pin_id: int | str | None = None,
        *,
        chunk_hashes: PromptHashes | None = None,
        instance_id: int | None = None,
        timeout_s: float | None = None,
        report_later: bool = False,
    ) -> int:
        """Tokens of the longest prefix cached for every rank of this instance's world.

        With ``pin_id`` the hit stays pinned until every rank retrieved with that pin id (and
        ``pin_owner`` = this instance), ``release`` is called, or the server's pin TTL passes.
        For an instance this client registered, it sends the prompt's chunk hashes (when the server
        allows it), not its tokens; pass ``chunk_hashes`` (from :meth:`chunk_hashes`) to reuse them.
        ``report_later``: a hit claimed in shared memory is reported with this client's next request or
        at ``claimed.report()``, not now (:mod:`~lmcache.server.client_claims`)."""
        iid = self._iid(instance_id)
        req = self.registrations.lookup_request(iid, tokens, cache_salt, pin_id, chunk_hashes)
        if pin_id is not None and isinstance(req, P.LookupHashes):
            claimed = self.claimed.lookup(req, timeout_s, report_later)
            if claimed is not None:
                return claimed
        if pin_id is not None and self.registrations.copies_itself(iid):
            return self.shared_l1.lookup(iid, req, timeout_s)  # keeps the pinned slots for the load
        return self._call(req, int, timeout_s)

    def chunk_hashes(
        self, tokens: Any, cache_salt: str | int | None = None, *, instance_id: int | None = None
    ) -> PromptHashes | None:
        """The digests of the prompt's full chunks as the server keys them for this instance (None: it
        wants tokens). Pass them to :meth:`lookup` and as the prompt of :meth:`store` and :meth:`retrieve`
        transfers: they then send 32 bytes per chunk instead of 8 per token, and nobody hashes again."""
        return self.registrations.chunk_hashes(self._iid(instance_id), tokens, cache_salt)

    def release(
        self,
        pin_id: int | str,
        *,
        pin_owner: int | None = None,
        instance_id: int | None = None,
        timeout_s: float | None = None,
    ) -> bool:
        req = P.Release(instance_id=self._iid(instance_id), pin_id=pin_id, pin_owner=pin_owner)
        self.shared_l1.forget_slots(pin_owner or req.instance_id, pin_id)
        self.registrations.unpinned(pin_owner or req.instance_id, pin_id)
        return self._call(req, bool, timeout_s, retry_unknown=False)

    def store(
        self,
        transfer: BlockTransfer[Tokens | bytes | PromptHashes],
        *,
        instance_id: int | None = None,
        timeout_s: float | None = None,
        after: CopyStart | None = None,
    ) -> int:
        """Save ``transfer``'s chunks from this rank's blocks; returns the tokens newly stored.

        The prompt is token ids, or a :class:`PromptHashes` (see :meth:`chunk_hashes`): it then travels
        as its chunk hashes, and only the full chunks they name are stored. CUDA: the copies follow
        ``after`` (the forward: an ``EventStart``), on the device where this process copies (shared L1:
        the store's host work overlaps it); an exported pool's server polls a forward event recorded
        after it (else this thread waits for it first). Without it the blocks must already hold their
        final values.
        """
        iid = self._iid(instance_id)
        if self.registrations.copies_itself(iid):
            return self.shared_l1.store(iid, transfer, timeout_s, after)
        req = P.Store(
            instance_id=iid,
            block_ids=P.tokens_to_bytes(transfer.block_ids),
            start=transfer.start,
            end=transfer.end,
            **self.registrations.prompt_fields(iid, transfer),
        )  # made while the forward may still run
        with self.registrations.after_forward(iid, after) as req.after_event:
            return self._call(req, int, timeout_s, deadline=True)

    def retrieve(
        self,
        transfer: BlockTransfer[Tokens | bytes | PromptHashes],
        pin_id: int | str | None = None,
        *,
        pin_owner: int | None = None,
        instance_id: int | None = None,
        timeout_s: float | None = None,
        stream: Any = None,
        layers: LayerReady | None = None,
    ) -> int:
        """Load tokens ``[transfer.start, transfer.end)`` into their blocks; returns how many were
        loaded (a prefix). ``layers``: a layer-wise shared-L1 load (:mod:`lmcache.layered_load`).

        The prompt as for :meth:`store`; hashes must name every chunk up to the one holding ``end``.
        ``stream`` (CUDA): the stream that reads the blocks next. The load comes after its work and
        before its later work; a shared-L1 load returns once its copies are enqueued, an exported
        pool's once the server has copied (after polling an event recorded on ``stream``, else once
        the host waited for ``stream``). Without it the blocks are loaded when the call returns.
        """
        iid = self._iid(instance_id)
        self.registrations.unpinned(pin_owner or iid, pin_id)  # the load holds its own pins
        if self.registrations.copies_itself(iid):
            return self.shared_l1.retrieve(iid, transfer, pin_id, pin_owner, timeout_s, stream, layers)
        req = P.Retrieve(
            instance_id=iid,
            block_ids=P.tokens_to_bytes(transfer.block_ids),
            start=transfer.start,
            end=transfer.end,
            pin_id=pin_id,
            pin_owner=pin_owner,
            **self.registrations.prompt_fields(iid, transfer),
        )  # made while the stream's earlier work may still run
        if stream is None:
            return self._call(req, int, timeout_s, deadline=True)
        # The server writes the blocks from another process, once that work is done.
        with self.registrations.after_stream(iid, stream) as req.after_event:
            return self._call(req, int, timeout_s, deadline=True)

    def heartbeat(self, *, timeout_s: float | None = None) -> P.HeartbeatInfo:
        """Refresh this client's instances; re-registers those the server no longer knows."""
        ids, (lookups, tokens) = self.registrations.ids(), self.registrations.take_misses()
        req = P.Heartbeat(instance_ids=ids, missed_lookups=lookups, missed_tokens=tokens)
        sent_at = self.registrations.clock()
        info = self._call(req, P.HeartbeatInfo, timeout_s)
        self.registrations.heard([iid for iid in ids if iid not in info.unknown], sent_at)
        if self.server_id is not None and info.server_id != self.server_id:
            logger.warning(
                "cache server at %s restarted (server id %s -> %s)", self.url, self.server_id, info.server_id
            )
        self.server_id = info.server_id
        sent_caps = dict(zip(ids, req.caps, strict=True))
        for iid in info.unknown:
            self._reregister(iid, timeout_s, sent_caps.get(iid))
        return info

    def stats(self, *, timeout_s: float | None = None) -> P.StatsInfo:
        return self._call(P.Stats(), P.StatsInfo, timeout_s)

    def clear(self, *, timeout_s: float | None = None) -> int:
        """Drop every cached chunk not pinned by a pending load (all clients'!)."""
        return self._call(P.Clear(), int, timeout_s)

    def close(self, *, unregister: bool = True) -> None:
        """Stop the threads and close the socket (first unregistering this client's pools)."""
        if self._closed:
            return
        self.claimed.report()
        if unregister:
            for iid in self.registrations.ids():
                with contextlib.suppress(ServerUnavailable, ServerError):
                    self.unregister(iid, timeout_s=min(self.timeout_s, 1.0))
        self._closed = True
        self._stop.set()
        self.shared_l1.close()  # its last load reports go first, then its slab mappings
        self.lanes.close()  # a call in flight notices within client_lanes.POLL_S
        if self._hb is not None and self._hb is not threading.current_thread():
            self._hb.join(timeout=5)

    def __enter__(self) -> CacheServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- calls ----------------------------------------------------------------------------------

    def _iid(self, instance_id: int | None) -> int:
        iid = self.instance_id if instance_id is None else instance_id
        if iid is None:
            raise RuntimeError("no instance registered with this client yet: call register(pool, ...) first")
        return iid

    def call(
        self, req: Any, result_type: type[T], *, timeout_s: float | None = None, retry: bool = True
    ) -> T:
        """Send one protocol request as built (credentials stamped in) and return its reply's value
        as ``result_type``. ``retry=False``: no re-registration on ``unknown_instance`` and no secret
        refresh on ``unauthorized``, the error is raised as the server sent it."""
        if not retry:
            return self._call_once(req, result_type, timeout_s, False)
        return self._call(req, result_type, timeout_s)

    def _call(
        self,
        req: Any,
        result_type: type[T],
        timeout_s: float | None,
        *,
        retry_unknown: bool = True,
        deadline: bool = False,
    ) -> T:
        try:
            return self._call_once(req, result_type, timeout_s, deadline)
        except Unauthorized:
            if not self.credentials.refresh():
                raise
            return self._call(req, result_type, timeout_s, retry_unknown=retry_unknown, deadline=deadline)
        except UnknownInstance:
            iid = getattr(req, "instance_id", None)
            if not retry_unknown or iid is None or iid not in self.registrations:
                raise
            self._reregister(iid, timeout_s, getattr(req, "cap", None))
            self.registrations.check_usable(iid, type(req).__struct_config__.tag)
            return self._call_once(req, result_type, timeout_s, deadline)

    def _reregister(self, iid: int, timeout_s: float | None, sent_cap: bytes | None) -> None:
        """Register ``iid`` again, which the server did not know under the capability ``sent_cap``; not
        if it was registered again since that was sent (by another thread: the caller retries with the
        new one). Other calls go on meanwhile; another re-registration waits for this one."""
        self.credentials.check_ipc_owner()
        with self.registrations.registering:
            reg = self.registrations.get(iid)
            if reg is None or (sent_cap and reg.info is not None and reg.info.cap != sent_cap):
                return
            if reg.policy == "auto":  # the new server may force another mode
                choose_again(reg, self.shared_l1, lambda: self.ping(timeout_s=timeout_s).pool_sharing)
            sent_at = self.registrations.clock()
            with refused_as_such():
                info = self._call_once(reg.request, P.RegisterInfo, timeout_s, False)
            with self.registrations.lock:
                reg.update(info, sent_at)
                self.server_id = info.server_id
                self.reregistrations += 1
        log_registered_again(self.url, iid, reg)

    def _call_once(self, req: Any, result_type: type[T], timeout_s: float | None, deadline: bool) -> T:
        parts = self._submit(req, result_type, timeout_s, deadline=deadline)
        value, more = parts.next()
        if more:  # the caller expects one reply (a load asking for parts goes through _submit)
            parts.cancel()
            raise ServerUnavailable(
                f"{type(req).__name__}: the server answered in parts; read them with _submit"
            )
        return value

    def _submit(
        self, req: Any, result_type: type[T], timeout_s: float | None, *, deadline: bool = False
    ) -> Submitted[T]:
        """Send ``req`` now; read its reply's parts from the returned :class:`Submitted` (errors raised
        as by :meth:`call`, without retries)."""
        frame, rid, op, timeout = self._frame(req, timeout_s, encode=not deadline)
        # With a deadline, framed once a lane is the call's, with the time left then: the server counts
        # it from the request's arrival, so it gives up no later than this client does.
        payload = functools.partial(_with_deadline, req) if deadline else frame
        pending = self.lanes.submit(payload, rid, op, timeout)
        return Submitted(pending, lambda reply: reply_value(reply, result_type, op))

    def _one_way(self, req: Any, timeout_s: float | None) -> Callable[[], None]:
        """``req`` framed now, one-way (no reply comes, not even an error); the call returned sends it."""
        req.one_way = True
        frame, _, op, timeout = self._frame(req, timeout_s)
        return functools.partial(self.lanes.send, frame, op, timeout)

    def _frame(
        self, req: Any, timeout_s: float | None, encode: bool = True, report_first: bool = True
    ) -> tuple[bytes, int, str, float]:
        """``req`` numbered and stamped: its frame (empty unless ``encode``), request id, op name and
        timeout; the lookups kept back are sent first (``report_first``), so ``req`` follows them."""
        if self._closed:
            raise ServerUnavailable("the cache server client is closed")
        if report_first:
            self.claimed.report()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        rid = next(self._rids)
        req.rid = rid
        self.credentials.stamp(req, self.registrations)
        frame = framing.encode_request(req) if encode else b""
        return frame, rid, type(req).__struct_config__.tag, timeout

    # ---- heartbeat ------------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            if not self.registrations:
                continue
            try:
                self.heartbeat(timeout_s=max(2.0, 2 * self.heartbeat_interval_s))
            except (ServerUnavailable, ServerError) as e:
                logger.debug("heartbeat to %s failed: %s", self.url, e)
            except Exception:
                if not self._stop.is_set():
                    logger.exception("heartbeat to %s", self.url)


def _with_deadline(req: Any, remaining_s: float) -> bytes:
    """``req``'s frame telling the server how long its client still waits (``timeout_ms``)."""
    req.timeout_ms = max(1, int(remaining_s * 1000))
    return framing.encode_request(req)


def wait_for_server(url: str | None = None, timeout_s: float = 30.0) -> P.PingInfo:
    """Ping until the server answers (for scripts and tests); raises ServerUnavailable after timeout_s."""
    deadline = time.monotonic() + timeout_s
    with CacheServerClient(url, timeout_s=1.0, heartbeat_interval_s=0, fail_fast=False) as client:
        while True:
            try:
                return client.ping(timeout_s=min(1.0, max(0.05, deadline - time.monotonic())))
            except ServerUnavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
