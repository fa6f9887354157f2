"""The client side of shared-L1 transfers, over a stand-in for the server's replies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from support.fresh_python import run_python

from lmcache.server import protocol as P
from lmcache.server.client_errors import ServerError, ServerUnavailable
from lmcache.server.client_shared_l1 import SharedL1Transfers
from lmcache.transfer import BlockTransfer

TRANSFER = BlockTransfer(list(range(64)), None, list(range(8)), 0, 64)


class _Registrations:
    """What SharedL1Transfers asks of the client's registrations: the prompt and the copier."""

    server_id = "server"

    def __init__(self, copy_fails: bool = False) -> None:
        self.copy_fails = copy_fails
        self.copied: list[P.LoadSlots] = []

    def prompt_fields(self, instance_id: int, transfer: BlockTransfer[Any]) -> dict[str, Any]:
        return {"tokens": P.tokens_to_bytes(transfer.prompt), "cache_salt": transfer.salt}

    def copier(self, instance_id: int) -> _Registrations:
        return self

    def geometry(self, instance_id: int) -> tuple[int, int]:
        return 64, 8  # chunk size, tokens per block

    def clock(self) -> float:
        return 0.0

    def may_be_reaped(self, instance_id: int) -> bool:
        return False  # a server that never reaps for silence

    def slots_guard(self, instance_id: int, granted: Any = None) -> None:
        return None  # nothing to check: a server that never reaps for silence

    def heard(self, instance_ids: list[int], sent_at: float) -> None:
        pass

    def check_blocks(self, block_ids: list[int], start: int, end: int, tokens_per_block: int) -> None:
        assert len(block_ids) * tokens_per_block >= end

    def begin_load(
        self, block_ids: list[int], after: Any = None, layers: Any = None, chunks: int = 0, guard: Any = None
    ) -> list[P.LoadSlots]:
        return []

    def add_looked_up(self, batch: list[P.LoadSlots], slots: list[P.SlotInfo], *args: Any) -> dict:
        return {}

    def names_every_chunk(self, slots: list[P.SlotInfo], *args: Any) -> bool:
        return False

    def add_load(
        self, batch: list[P.LoadSlots], reply: P.LoadSlots, block_ids: list[int], queued: Any = None
    ) -> None:
        if self.copy_fails:
            raise RuntimeError("copy failed")
        batch.append(reply)

    def finish_load(self, batch: list[P.LoadSlots], stream: Any = None, *, ordered: bool = True) -> None:
        self.copied.extend(batch)

    def abandon(self, batch: list[P.LoadSlots]) -> None:
        pass  # CPU copies are done when enqueued


class _OnePart:
    """A submitted load whose whole reply is one part."""

    def __init__(self, reply: P.LoadSlots) -> None:
        self.reply = reply

    def next(self) -> tuple[P.LoadSlots, bool]:
        return self.reply, False

    def cancel(self) -> None:
        pass


def _load_answered(req: Any, result_type: type, timeout_s: float | None, **kw: Any) -> _OnePart:
    assert isinstance(req, P.Load)
    return _OnePart(P.LoadSlots(ticket=7, loaded=64))


def _no_call(*args: Any, **kw: Any) -> Any:
    raise AssertionError("the load is submitted, not called")


def _unreachable_one_way(req: Any, timeout_s: float | None) -> Callable[[], None]:
    """Frames ``req``; sending it finds the server gone."""

    def send() -> None:
        raise ServerUnavailable("cache server at ipc:///x is unreachable")

    return send


def _transfers(regs: _Registrations) -> SharedL1Transfers:
    return SharedL1Transfers(_no_call, _load_answered, _unreachable_one_way, regs)  # type: ignore[arg-type]


def test_a_completed_load_counts_even_if_its_report_cannot_be_delivered() -> None:
    regs = _Registrations()
    assert _transfers(regs).retrieve(1, TRANSFER, None, None, 5.0) == 64
    assert len(regs.copied) == 1


def test_a_failed_copy_fails_the_load_whatever_the_report_does() -> None:
    with pytest.raises(RuntimeError, match="copy failed"):
        _transfers(_Registrations(copy_fails=True)).retrieve(1, TRANSFER, None, None, 5.0)


class _AsyncCopier(_Registrations):
    """A copier whose copies run asynchronously, as on a CUDA stream: enqueued by ``add_looked_up`` and
    ``add_load``, complete only once ``finish_load`` or ``abandon`` waits for them. ``log`` records
    when copies complete and when each one-way report is sent, with the copies still running then."""

    def __init__(self, looked_up: bool = False) -> None:
        super().__init__()
        self.looked_up = looked_up
        self.running = 0
        self.log: list[tuple[str, int]] = []

    def names_every_chunk(self, slots: list[P.SlotInfo], *args: Any) -> bool:
        return self.looked_up

    def add_looked_up(self, batch: list[P.LoadSlots], slots: list[P.SlotInfo], *args: Any) -> dict:
        self.running += len(slots)
        return {}

    def add_load(
        self, batch: list[P.LoadSlots], reply: P.LoadSlots, block_ids: list[int], queued: Any = None
    ) -> None:
        self.running += len(reply.chunks)

    def finish_load(self, batch: list[P.LoadSlots], stream: Any = None, *, ordered: bool = True) -> None:
        self.abandon(batch)

    def abandon(self, batch: list[P.LoadSlots]) -> None:
        self.log.append(("copies complete", self.running))
        self.running = 0

    def one_way(self, req: Any, timeout_s: float | None) -> Callable[[], None]:
        return lambda: self.log.append((type(req).__name__, self.running))


_SLOT = P.SlotInfo(slab=1, offset=0, nbytes=64)
_CHUNK = P.LoadChunk(0, 8, 0, 8, _SLOT)


class _Parts:
    """A load answered in two parts (``first`` chunks, then the rest), the second refused."""

    def __init__(self) -> None:
        self.read = 0

    def next(self) -> tuple[P.LoadSlots, bool]:
        self.read += 1
        if self.read == 1:
            return P.LoadSlots(ticket=7, loaded=256, chunks=[_CHUNK] * 4), True
        raise ServerError("limit", "pins over this instance's share of L1", "load")

    def cancel(self) -> None:
        pass


def _refused(req: Any, result_type: type, timeout_s: float | None, **kw: Any) -> Any:
    raise ServerError("limit", "pins over this instance's share of L1", "load")


def test_a_load_whose_second_part_is_refused_unpins_its_slots_only_after_the_first_parts_copies() -> None:
    """The copies of the first part were still running when ``load_done`` unpinned their slots (the
    server could then fill them again while the device read them), and the failed load returned with
    them still writing its blocks."""
    copier = _AsyncCopier()
    transfers = SharedL1Transfers(_no_call, lambda *a, **kw: _Parts(), copier.one_way, copier)  # type: ignore[arg-type]
    with pytest.raises(ServerError, match="share of L1"):
        transfers.retrieve(1, TRANSFER, None, None, 5.0)
    assert copier.log == [("copies complete", 4), ("LoadDone", 0)]


def test_a_refused_load_returns_only_once_the_copies_from_its_lookups_slots_are_done() -> None:
    """The copies a load starts from the slots its lookup pinned, before the reply, were left running
    when the server refused the load: its caller then releases those pins, or reuses the blocks."""
    copier = _AsyncCopier(looked_up=True)
    transfers = SharedL1Transfers(_no_call, _refused, copier.one_way, copier)  # type: ignore[arg-type]
    transfers.remember_slots(1, "pin", [_SLOT, _SLOT])
    with pytest.raises(ServerError, match="share of L1"):
        transfers.retrieve(1, TRANSFER, "pin", None, 5.0)
    assert copier.running == 0 and copier.log == [("copies complete", 2)]


def test_a_load_failing_before_its_first_part_is_read_gives_its_lane_and_its_ticket_back() -> None:
    """A copy that raised between sending the load and reading its reply left the reply unread and its
    lane held for good (the client has only a few), and the ticket the reply opened, with its pins,
    open until the registration went."""

    class _CopyFails(_AsyncCopier):
        def add_looked_up(self, batch: list[P.LoadSlots], slots: list[P.SlotInfo], *args: Any) -> dict:
            raise RuntimeError("slab not mapped")

    parts = _Parts()
    cancelled: list[bool] = []
    parts.cancel = lambda: cancelled.append(True)  # type: ignore[method-assign]
    copier = _CopyFails()
    transfers = SharedL1Transfers(_no_call, lambda *a, **kw: parts, copier.one_way, copier)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="slab not mapped"):
        transfers.retrieve(1, TRANSFER, None, None, 5.0)
    assert cancelled and parts.read == 1  # its first part read for the ticket, the rest given up
    assert [what for what, _ in copier.log].count("LoadDone") == 1


@pytest.mark.parametrize("transfers", [True, False])
def test_the_transfers_resolve_their_reply_types_before_the_first_reply(transfers: bool) -> None:
    """msgspec resolves a reply type's annotations at its first decode; the client's shared-L1 transfers
    do it when built, so no lookup, save or load pays for it (and without them the first decode does:
    the check can fail). In a fresh interpreter: a type once resolved stays resolved."""
    code = f"""
        import json
        import sys
        import msgspec
        from lmcache.server import protocol as P
        from lmcache.server.client_shared_l1 import SharedL1Transfers
        if {transfers}:
            SharedL1Transfers(None, None, None, None)
        calls = []
        def profile(frame, event, arg):
            if event == "call" and frame.f_code.co_name == "get_class_annotations":
                calls.append(1)
        sys.setprofile(profile)
        for reply in (P.LookupSlots, P.StoreSlots, P.LoadSlots):
            try:
                msgspec.convert({{}}, reply)
            except msgspec.ValidationError:
                pass
        sys.setprofile(None)
        print(json.dumps(len(calls)))
    """
    resolved = run_python(code)
    assert (resolved == 0) == transfers
