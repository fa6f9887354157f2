"""Worker-side tracking of transfers still running, so ``get_finished`` reports each id once, when done."""

from __future__ import annotations

from collections.abc import Callable, Iterable

Done = Callable[[], bool]


def event_done(event: object) -> Done:
    """A completion check for a CUDA event (``None``: the copy was synchronous, already done)."""
    if event is None:
        return lambda: True
    return event.query  # type: ignore[attr-defined,no-any-return]


class InflightTransfers:
    """Per request: the completion checks of its transfers, and whether TRT-LLM asked about it."""

    def __init__(self) -> None:
        self._pending: dict[int, list[Done]] = {}
        self._asked: set[int] = set()

    def __len__(self) -> int:
        """Requests still tracked: transfers not reported yet, or ids asked about."""
        return len(self._pending.keys() | self._asked)

    def add(self, request_id: int, done: Done) -> None:
        self._pending.setdefault(request_id, []).append(done)

    def pending(self, request_id: int) -> list[Done]:
        """The completion checks of ``request_id``'s transfers not yet seen done."""
        return list(self._pending.get(request_id, []))

    def ask(self, request_ids: Iterable[int]) -> None:
        """TRT-LLM passed these ids in; report each once its transfers have landed."""
        self._asked.update(request_ids)

    def poll(self) -> list[int]:
        """Ids asked about whose transfers are all done; each returned once."""
        ready = []
        for request_id in list(self._asked):
            checks = self._pending.get(request_id, [])
            if all(done() for done in checks):
                self._pending.pop(request_id, None)
                self._asked.discard(request_id)
                ready.append(request_id)
        for request_id in [r for r in self._pending if r not in self._asked]:
            remaining = [done for done in self._pending[request_id] if not done()]
            if remaining:
                self._pending[request_id] = remaining
            else:
                del self._pending[request_id]
        return sorted(ready)
