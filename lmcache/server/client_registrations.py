"""What a :class:`~lmcache.server.client.CacheServerClient` keeps about itself: its registered pools
(:class:`Registrations`, with the key scheme the server announced for each, so a prompt can travel
as its chunk hashes, :class:`PromptHashes`) and its credentials (:class:`Credentials`)."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmcache.keys import HASH_ALGORITHMS, TokenHasher, Tokens, native_chain
from lmcache.server import protocol as P
from lmcache.server.claims import ClaimView
from lmcache.server.client_errors import ServerError, ServerUnavailable, SettingsMismatch
from lmcache.server.presence import PresenceView
from lmcache.server.security import client_secret, trusted_owner
from lmcache.transfer import BlockTransfer

if TYPE_CHECKING:  # torch loads with the first shared-L1 registration: `lmcache stats` never imports it
    from lmcache.chunk_copy import CopyStart
    from lmcache.server.forward_events import ForwardEvents
    from lmcache.server.shared_l1_worker import SharedL1Copier
    from lmcache.server.slab_mappings import SlabMappings

__all__ = ["Claimed", "Credentials", "PromptHashes", "Registration", "Registrations"]

PIN_TTL_S = 120.0
"""How long a claimed lookup's pins count against the share here at most (the server's default
``--pin-ttl-s``: it drops pins no load or release came back for by then)."""


@dataclass(frozen=True)
class PromptHashes:
    """A prompt's chunk hashes (:meth:`CacheServerClient.chunk_hashes`), the key scheme that made
    them, and the prompt they were made from: a call uses the hashes only for an instance whose
    scheme is the same, else it sends ``tokens`` and ``cache_salt``."""

    scheme: bytes
    digests: bytes
    """The full chunks' digests, in order, concatenated."""
    tokens: Tokens | bytes
    """The prompt's token ids (kept by reference, never copied)."""
    cache_salt: str | int | None


@dataclass(frozen=True)
class Claimed:
    """A hit claimed through the server's shared memory: its tokens, the claimed entries (sent with
    the lookup that pins them), and for a shared-L1 registration its rank's slots (its load copies
    from them before the server answers)."""

    tokens: int
    entries: bytes
    slots: list[P.SlotInfo]
    nbytes: int
    """What its pins hold in L1 (every rank's chunks)."""


@dataclass
class Registration:
    """A pool this client registered: the request (sent again to re-register), what keeps the memory
    alive, and what the server answered."""

    request: P.Register
    keep_alive: Any  # the pool tensor / wrapper: the memory must outlive the registration
    info: P.RegisterInfo | None = None
    hasher: TokenHasher | None = None
    """Hashes prompts as the server keys this instance's chunks; None: lookups carry tokens."""
    policy: str = "export"
    """The pool-sharing policy it was registered with (``auto`` is chosen again at re-registration)."""
    copier: SharedL1Copier | None = None
    """Set in the shared-L1 mode: copies between the pool and the server's L1 slots."""
    presence: PresenceView | None = None
    """The server's counts of its L1 chunks, mapped (None: it offers none, or they cannot be mapped)."""
    claims: ClaimView | None = None
    """The server's claim index and this instance's claims, mapped (None: lookups ask the server)."""
    chunk_size: int | None = None
    """The chunk size the caller plans in (None: whatever the server's): a server answering another
    one leaves the registration unusable (:attr:`mismatch`) until one answering it registers it again."""
    heard_at: float = 0.0
    """When the latest request naming it that the server answered was sent (``time.monotonic()``,
    shared by every process of the host): the server has seen it alive since at least then."""

    def may_be_reaped(self, now: float) -> bool:
        """Whether the server may have retired it for silence by ``now``: half its
        :attr:`P.RegisterInfo.reap_after_s` has passed since :attr:`heard_at` (a stopped process
        resuming), and its leased slots and pins may be other chunks' now."""
        reap_after = 0.0 if self.info is None else self.info.reap_after_s
        return reap_after > 0 and now - self.heard_at > reap_after / 2

    @property
    def mode(self) -> str:
        """How the pool is shared (:data:`lmcache.server.protocol.SHARING_MODES`)."""
        return P.sharing_mode(self.request.pool)

    @property
    def mismatch(self) -> SettingsMismatch | None:
        """Why the instance must not be used with the server that last registered it, or None."""
        if self.chunk_size is None or self.info is None or self.info.chunk_size == self.chunk_size:
            return None
        return SettingsMismatch("register", self.info.chunk_size, self.chunk_size)

    def update(self, info: P.RegisterInfo, sent_at: float) -> None:
        """What the server answered to (re-)registering, sent at ``sent_at``; a new server's slabs are
        mapped afresh. With another chunk size than :attr:`chunk_size`, nothing of the server's is
        mapped or hashed for."""
        usable = self.chunk_size is None or info.chunk_size == self.chunk_size
        if self.copier is not None:
            self.copier.on_server(info.server_id, info.cap)
            if usable:
                self.copier.warm_up(info.chunk_size // self.request.tokens_per_block)  # once per copier
                self.copier.map_ahead(info.slabs_ahead)
        self.info = info
        # Last: a store reading a fresh time must find the leases of an earlier registration gone.
        self.heard_at = max(self.heard_at, sent_at)
        if not usable:
            self.presence = self.claims = self.hasher = None
            return
        if info.presence is None:
            self.presence = None
        elif self.presence is None or self.presence.info != info.presence:
            self.presence = PresenceView.map(info.presence)
        if info.claims is None:
            self.claims = None
        elif self.claims is None or self.claims.regions != info.claims:
            self.claims = ClaimView.map(info.claims)
        hashing = info.hashing
        self.hasher = None
        if hashing is not None and hashing.algorithm in HASH_ALGORITHMS:
            self.hasher = TokenHasher(
                info.chunk_size, hashing.algorithm, self.request.model_name, hashing.layout_signature
            )


class Registrations:
    """The pools a client registered, by instance id. ``registering`` serialises (re-)registrations and
    is held across their calls to the server; ``lock`` guards the table and the bookkeeping beside it,
    held briefly (a lookup's claims and pins take it: never the length of a call to the server)."""

    def __init__(self) -> None:
        self.registering = threading.Lock()
        self.lock = threading.RLock()
        self.clock: Callable[[], float] = time.monotonic
        """When requests were sent and :meth:`may_be_reaped` asks (the host's monotonic clock, which
        the server's reaper reads too)."""
        self._table: dict[int, Registration] = {}
        self._misses = (0, 0)
        self._pins: dict[tuple[int, int | str], tuple[int, float]] = {}
        """(instance, pin id) of a claimed lookup -> (bytes it pins, when)."""
        self._slabs: dict[bool, SlabMappings] = {}
        """The server's slabs as this client mapped them, page-locked or not: its copiers share them."""

    def slab_mappings(self, pin: bool) -> SlabMappings:
        """The mappings the shared-L1 copiers of this client share (one per ``pin``: page-locked for
        CUDA pools, plain for CPU pools), so a slab is mapped once however many pools register."""
        with self.lock:
            if pin not in self._slabs:
                from lmcache.server.slab_mappings import SlabMappings

                self._slabs[pin] = SlabMappings(pin=pin)
            return self._slabs[pin]

    def close(self) -> None:
        """Forget every slab mapping (they go once no copy's view of them is left)."""
        with self.lock:
            mappings = list(self._slabs.values())
        for slabs in mappings:
            slabs.clear()

    def count_miss(self, tokens: int) -> None:
        """A lookup of ``tokens`` tokens found missing in the presence counts (the server never saw it);
        the next heartbeat reports it (:meth:`take_misses`), so the server's hit rate counts it."""
        with self.lock:
            lookups, total = self._misses
            self._misses = (lookups + 1, total + tokens)

    def take_misses(self) -> tuple[int, int]:
        """The misses counted since the last call: (lookups, tokens)."""
        with self.lock:
            misses, self._misses = self._misses, (0, 0)
            return misses

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._table

    def __bool__(self) -> bool:
        return bool(self._table)

    def ids(self) -> list[int]:
        with self.lock:
            return list(self._table)

    def get(self, instance_id: int) -> Registration | None:
        return self._table.get(instance_id)

    def heard(self, instance_ids: list[int], sent_at: float) -> None:
        """The server answered a request naming ``instance_ids``, sent at ``sent_at`` (no lock: a lost
        race keeps the earlier time, which only makes :meth:`may_be_reaped` more cautious)."""
        for iid in instance_ids:
            reg = self._table.get(iid)
            if reg is not None:
                reg.heard_at = max(reg.heard_at, sent_at)

    def may_be_reaped(self, instance_id: int) -> bool:
        """See :meth:`Registration.may_be_reaped` (False for an instance not registered here)."""
        reg = self.get(instance_id)
        return reg is not None and reg.may_be_reaped(self.clock())

    def slots_guard(
        self, instance_id: int, granted: Callable[[], bytes | None] | None = None
    ) -> Callable[[], None]:
        """What each batch of a shared-L1 store's or load's copies checks before it is enqueued: the
        slots may still be this process's (see :meth:`check_slots`). ``granted`` tells the capability
        of the registration they were granted to when the batch's copies run (default: the one of
        now)."""
        cap = self.cap(instance_id)
        return functools.partial(self.check_slots, instance_id, granted or (lambda: cap))

    def check_slots(self, instance_id: int, granted: Callable[[], bytes | None]) -> None:
        """Raise if L1 slots granted to the registration of capability ``granted()`` may be other
        chunks' now: the instance registered again since (the server forgot that registration), or the
        server may have reaped it for silence."""
        if self.cap(instance_id) != granted():
            raise ServerUnavailable(
                "the instance registered with the cache server again while its copies waited, so the L1 "
                "slots they were given went with its earlier registration; the copies were not made"
            )
        if self.may_be_reaped(instance_id):
            raise ServerUnavailable(
                "this process has not heard from the cache server for over half its client timeout "
                "(stopped?), so the server may have reaped it and given its L1 slots to other chunks; "
                "the copies were not made"
            )

    def add(self, instance_id: int, registration: Registration) -> None:
        with self.lock:
            self._table[instance_id] = registration

    def pop(self, instance_id: int) -> int | None:
        """Forget a registration (its copier closed: streams handed back); the id of another one (the
        client's new default), or None."""
        with self.lock:
            reg = self._table.pop(instance_id, None)
            if reg is not None and reg.copier is not None:
                reg.copier.close()
            return next(iter(self._table), None)

    @contextlib.contextmanager
    def after_forward(self, instance_id: int, after: CopyStart | None) -> Iterator[int | None]:
        """A transfer of an exported pool whose copies follow ``after`` (a store's forward): the
        ``after_event`` naming a forward event the server waits for, else None once the forward ended
        here (no event left, or the server opened none)."""
        forward = after.wait() if after is not None else None
        events = None if forward is None else self._forward_events(instance_id)
        if events is None:
            if forward is not None:
                forward.synchronize()
            yield None
            return
        with events.after(forward) as index:
            yield index

    @contextlib.contextmanager
    def after_stream(self, instance_id: int, stream: Any) -> Iterator[int | None]:
        """A load into an exported pool after the work on ``stream`` so far: as :meth:`after_forward`
        with that work as the forward."""
        from lmcache.chunk_copy import EventStart  # imports torch: a CUDA pool's, loaded already

        with self.after_forward(instance_id, EventStart.on(stream)) as index:
            yield index

    def _forward_events(self, instance_id: int) -> ForwardEvents | None:
        """The forward events of an exported CUDA pool the server opened, else None."""
        reg = self._table.get(instance_id)
        if (
            reg is None
            or not isinstance(reg.request.pool, P.CudaIpcPool)
            or not (reg.info and reg.info.forward_events)
        ):
            return None
        from lmcache.server.forward_events import ForwardEvents  # imports torch: CUDA pools only

        return ForwardEvents.named(reg.request.pool.forward_events)

    def copies_itself(self, instance_id: int) -> bool:
        """Whether this client registered the instance in the shared-L1 mode (it copies itself)."""
        reg = self._table.get(instance_id)
        return reg is not None and reg.copier is not None

    def copier(self, instance_id: int) -> SharedL1Copier:
        """The copier of a shared-L1 registration (re-registering may have changed the mode)."""
        reg = self._table.get(instance_id)
        if reg is None or reg.copier is None:
            raise ServerError(
                P.ErrorCode.INVALID.value,
                f"instance {instance_id} is no longer registered in the shared-l1 mode by this client",
                "copy",
            )
        return reg.copier

    def wait_slabs_mapped(self, timeout_s: float | None = None) -> bool:
        """Wait until the server L1 slabs announced to this client (before and at its shared-L1
        registrations, and in their replies) are mapped (and page-locked), which goes on in the
        background; False on timeout. A save meanwhile may wait for it: benchmarks of a steady state
        wait here first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self.lock:
            mappings = list(self._slabs.values())
        for slabs in mappings:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not slabs.wait_ahead(left):
                return False
        return True

    def check_usable(self, instance_id: int, op: str) -> None:
        """Raise :class:`SettingsMismatch` if the server registered the instance with another chunk
        size than it was registered for (an instance this client does not hold passes)."""
        reg = self._table.get(instance_id)
        mismatch = reg.mismatch if reg is not None else None
        if mismatch is not None:
            raise SettingsMismatch(op, mismatch.server_chunk_size, mismatch.chunk_size)

    def cap(self, instance_id: int) -> bytes:
        """The capability the server gave the instance (b"" if unknown)."""
        reg = self._table.get(instance_id)
        return reg.info.cap if reg is not None and reg.info is not None else b""

    def chunk_size(self, instance_id: int) -> int | None:
        """The server's chunk size for the instance (None while this client has no registration of it)."""
        reg = self._table.get(instance_id)
        return reg.info.chunk_size if reg is not None and reg.info is not None else None

    def presence(self, instance_id: int) -> PresenceView | None:
        """The counts of the server's L1 chunks as this client mapped them for the instance (None: ask
        the server about every prompt)."""
        reg = self._table.get(instance_id)
        return reg.presence if reg is not None else None

    def published_first_chunk(self, instance_id: int, fields: dict[str, Any]) -> None:
        """A store of the prompt :meth:`prompt_fields`' ``fields`` name is about to report its first
        chunk published, one-way: the instance's presence view shows it from now on (a lookup of the
        prompt then asks the server, which reads the report first), not only once the counts do."""
        reg = self._table.get(instance_id)
        if reg is None or reg.presence is None or reg.hasher is None or reg.info is None:
            return  # no counts read for this instance: every lookup asks the server
        first = fields.get("chunk_hashes")
        if not first:
            tokens = P.ids_from_wire(fields["tokens"][: reg.info.chunk_size * P.TOKEN_BYTES], "tokens")
            first = reg.hasher.chunk_digests(tokens, fields.get("cache_salt"))
        if first:
            reg.presence.published(first[: reg.hasher.digest_size])

    def pinned(self, instance_id: int, pin_id: int | str, claimed: Claimed) -> None:
        """A claimed lookup went out: its pins count against the instance's share until this client
        releases or loads them, or the server's pin TTL passes (see :meth:`claim`)."""
        with self.lock:
            self._pins[instance_id, pin_id] = (claimed.nbytes, time.monotonic())

    def unpinned(self, instance_id: int, pin_id: int | str | None) -> None:
        """The lookup's pins went (released, or the load holds its own)."""
        if pin_id is not None:
            with self.lock:
                self._pins.pop((instance_id, pin_id), None)

    def _pinned_bytes(self, instance_id: int, except_pin: int | str) -> int:
        """What this client's claimed lookups of the instance may still hold (the lock held)."""
        now = time.monotonic()
        for key in [k for k, (_, at) in self._pins.items() if now - at > PIN_TTL_S]:
            del self._pins[key]
        return sum(n for (iid, pin), (n, _) in self._pins.items() if iid == instance_id and pin != except_pin)

    def can_claim(self, instance_id: int) -> bool:
        """Whether this client claims the instance's hits through the server's shared memory."""
        reg = self._table.get(instance_id)
        return reg is not None and reg.claims is not None

    def claim(self, instance_id: int, digests: bytes, pin_id: int | str) -> Claimed | None:
        """Claim the leading chunks of the prompt ``digests`` names, for every rank of the instance's
        world (:mod:`lmcache.server.claims`), for the lookup ``pin_id``; None when the lookup must ask
        the server: this client cannot claim for the instance, the claim stopped at a chunk being
        stored, or its pins and this client's other pinned lookups would pass the instance's share
        (the server then says whether it refuses them)."""
        reg = self._table.get(instance_id)
        if reg is None or reg.claims is None or reg.hasher is None or reg.info is None:
            return None
        world, regions = reg.request.world_size, reg.claims.regions
        chunks, entries, pending = reg.claims.claim(digests, reg.hasher.digest_size, world, range(world))
        nbytes = chunks * regions.chunk_bytes * world
        with self.lock:
            over = self._pinned_bytes(instance_id, pin_id) + nbytes > regions.share_bytes
        if pending or over:
            reg.claims.unclaim(entries)
            return None
        slots = reg.claims.slots(entries, world, reg.request.rank) if reg.copier is not None else []
        return Claimed(chunks * reg.info.chunk_size, entries, slots, nbytes)

    def unclaim(self, instance_id: int, entries: bytes) -> None:
        """Give back claims whose lookup could not be sent."""
        reg = self._table.get(instance_id)
        if reg is not None and reg.claims is not None:
            reg.claims.unclaim(entries)

    def geometry(self, instance_id: int) -> tuple[int, int]:
        """The instance's chunk size and tokens per block."""
        reg = self._table[instance_id]
        assert reg.info is not None
        return reg.info.chunk_size, reg.request.tokens_per_block

    def prompt_length(self, instance_id: int, fields: dict[str, Any]) -> int:
        """Tokens that :meth:`prompt_fields`' ``fields`` name (chunk hashes name full chunks only)."""
        reg = self._table[instance_id]
        digests = fields.get("chunk_hashes")
        if digests and reg.hasher is not None and reg.info is not None:
            return len(digests) // reg.hasher.digest_size * reg.info.chunk_size
        return len(fields["tokens"]) // P.TOKEN_BYTES

    def chunk_hashes(
        self, instance_id: int, tokens: Any, cache_salt: str | int | None
    ) -> PromptHashes | None:
        """The prompt's chunk digests as the server keys this instance's chunks (None: send tokens)."""
        reg = self._table.get(instance_id)
        if reg is None or reg.hasher is None:
            return None
        ids = (
            P.ids_from_wire(bytes(tokens), "tokens")
            if isinstance(tokens, (bytes, bytearray, memoryview))
            else tokens
        )
        return PromptHashes(reg.hasher.scheme, reg.hasher.chunk_digests(ids, cache_salt), tokens, cache_salt)

    def lookup_request(
        self,
        instance_id: int,
        tokens: Any,
        cache_salt: str | int | None,
        pin_id: int | str | None,
        hashes: PromptHashes | None,
    ) -> P.Lookup | P.LookupHashes:
        """The lookup of a prompt for the instance: by its chunk hashes (``hashes`` if usable, else
        hashed here) when the server keys the instance's chunks so, else by its tokens;
        :class:`SettingsMismatch` if the instance is not to be used (see :meth:`check_usable`)."""
        self.check_usable(instance_id, "lookup")
        digests = self.digests(instance_id, hashes)
        if digests is None:
            hashed = self.chunk_hashes(instance_id, tokens, cache_salt)
            digests = hashed.digests if hashed is not None else None
        if digests is None:
            wire_tokens = P.tokens_to_bytes(tokens)
            return P.Lookup(instance_id=instance_id, tokens=wire_tokens, cache_salt=cache_salt, pin_id=pin_id)
        wire = isinstance(tokens, (bytes, bytearray, memoryview))
        num_tokens = len(tokens) // P.TOKEN_BYTES if wire else len(tokens)
        return P.LookupHashes(
            instance_id=instance_id, chunk_hashes=digests, num_tokens=num_tokens, pin_id=pin_id
        )

    def digests(self, instance_id: int, hashes: PromptHashes | None) -> bytes | None:
        """``hashes``' digests if the server keys this instance's chunks by the same scheme (it may
        have restarted with another, or the instance has another layout); else None: send tokens."""
        reg = self._table.get(instance_id)
        if hashes is None or reg is None or reg.hasher is None or reg.hasher.scheme != hashes.scheme:
            return None
        return hashes.digests

    def prompt_fields(
        self, instance_id: int, transfer: BlockTransfer[Tokens | bytes | PromptHashes]
    ) -> dict[str, Any]:
        """The prompt fields of a store or retrieve: the chunk hashes if given and usable; else hashed
        here when the range ends on a chunk boundary and the C chain hashes the token list (cheaper than
        packing the tokens, a frame 64 times smaller, and the server hashes nothing; hashes name full
        chunks only, and a load's must reach its end, so a range ending inside a chunk keeps the
        tokens); else tokens.
        :class:`SettingsMismatch` if the instance is not to be used (see :meth:`check_usable`)."""
        self.check_usable(instance_id, "transfer")
        prompt = transfer.prompt
        if isinstance(prompt, PromptHashes):
            digests = self.digests(instance_id, prompt)
            if digests is not None:
                return {"tokens": b"", "chunk_hashes": digests}
            tokens, salt = prompt.tokens, prompt.cache_salt
        else:
            tokens, salt = prompt, transfer.salt
        if (
            type(tokens) is list
            and native_chain() is not None
            and self._ends_on_chunk(instance_id, transfer.end)
        ):
            hashed = self.chunk_hashes(instance_id, tokens, salt)
            if hashed is not None:
                return {"tokens": b"", "chunk_hashes": hashed.digests}
        return {"tokens": P.tokens_to_bytes(tokens), "cache_salt": salt}

    def _ends_on_chunk(self, instance_id: int, end: int) -> bool:
        """Whether a range ending at ``end`` ends on one of the instance's chunk boundaries."""
        reg = self._table.get(instance_id)
        return reg is not None and reg.info is not None and end > 0 and end % reg.info.chunk_size == 0


class Credentials:
    """What a client proves itself with (``docs/security.md``): over TCP the server secret (given, or
    ``$LMCACHE_SERVER_SECRET``, or this user's secret file, read again while missing and after a
    refusal); over ``ipc://`` it checks instead that the socket belongs to this user or root."""

    def __init__(self, url: str, secret: bytes | str | None) -> None:
        self.ipc_path = url[len("ipc://") :] if url.startswith("ipc://") else None
        # Never handed to a Unix socket, whose owner is checked instead.
        self._tcp = url.startswith("tcp://")
        self._find = secret is None
        self._secret: bytes | None = secret.encode() if isinstance(secret, str) else secret
        if self._tcp and self._find:
            self._secret = client_secret()

    def secret(self) -> bytes | None:
        """The secret a request carries now."""
        if self._tcp and self._secret is None and self._find:
            self._secret = client_secret()
        return self._secret

    def refresh(self) -> bool:
        """After an ``unauthorized`` reply: whether a new secret was found (then retry the call)."""
        if not (self._tcp and self._find) or client_secret() in (None, self._secret):
            return False
        self._secret = client_secret()  # the server's secret changed (a new file, after a restart)
        return True

    def stamp(self, req: Any, registrations: Registrations) -> None:
        """Put the credentials in ``req``: the server secret (TCP), the named instances' capabilities."""
        req.auth = self.secret()
        if isinstance(req, P.Heartbeat):
            req.caps = [registrations.cap(iid) for iid in req.instance_ids]
        elif isinstance(req, (P.StoreDone, P.LoadDone, P.Abandon)) and req.cap:
            pass  # a report carries the capability its ticket was granted to (client_shared_l1)
        elif hasattr(req, "cap"):  # the current one: a retry after re-registering has a new one
            req.cap = registrations.cap(req.instance_id) or req.cap

    def check_ipc_owner(self) -> None:
        """Before a pool descriptor goes out: refuse an ipc socket another user owns (an impostor
        that took the path first would be handed the pool)."""
        if self.ipc_path is None:
            return
        try:
            owner = os.stat(self.ipc_path).st_uid
        except OSError:
            return  # not there (yet): the call fails as unreachable
        if not trusted_owner(owner):
            raise ServerUnavailable(
                f"the socket {self.ipc_path} belongs to uid {owner}, not to this user or root: refusing to "
                "hand it the KV pool; stop whatever made it, or use another --ipc-path / server_url"
            )
