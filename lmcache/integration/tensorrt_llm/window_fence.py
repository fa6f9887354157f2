"""A sliding window's pages go back to TRT-LLM's pool while the request runs: the forward that may
reuse one is ordered after every save still reading it.

KVCacheManagerV2 frees a running request's pages of a sliding-window group of window ``W`` as soon as
no later token can see them: with ``E`` tokens computed, the next token (position ``E``) sees keys from
``E + 1 - W`` on, so every page ending at or before ``E + 1 - W`` (sink pages excepted) may be given
to another request in the next scheduling pass and written by the next forward. A save of such a page
is planned in the iteration its tokens completed, but its copies run later, on the saver thread and a
side stream ordered after the forward that computed them only. So:

- the scheduler numbers every save (``ConnectorMetadata.first_save_id``: ``saves[i]`` is save
  ``first_save_id + i``) and, in the metadata of the iteration whose forward brings a request to
  ``E`` tokens, names in ``ConnectorMetadata.fence_saves``, once each, the request's sliding-group
  saves (this iteration's included) whose ``first page end <= E + 1 - W + tokens_per_block``; the
  page of margin covers a token count one behind (the overlap scheduler reports a decode step before
  its token is known). Full-attention groups lose no page while the request runs: their saves are
  never fenced (``request_finished`` keeps the pages until ``get_finished`` reports the saves
  landed). Sink pages are never freed, but the scheduler does not know how many there are: a save
  starting on one is fenced as if its first page could go (never later than needed);
- the worker, in ``wait_for_save(stream)``, orders ``stream`` after those saves' copies, so the next
  forward (its execution stream waits on ``stream``) and the next iteration's loads follow them. A
  save whose copies landed costs nothing (the usual decode case: a chunk ``[s, s + C)`` is fenced at
  ``E = s + W - 1``, ``W - 1 - C`` steps after it was planned). One still queued is waited for: on
  the host until the saver thread handed its copies to the device, then on the device
  (``stream.wait_event``), or on the host for a save whose copies are done when it returns (the cache
  server's; CPU pools). A prefill step longer than ``W`` waits for its own sliding-group saves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from lmcache.integration.tensorrt_llm.inflight import event_done
from lmcache.integration.tensorrt_llm.plan import ConnectorMetadata
from lmcache.integration.tensorrt_llm.save_fence import SaveFence

SaveCopies = list[Future[Any]]
"""One save's copies, one future per pool region: each resolves once its store has run, to the CUDA
event its copies must be followed by (None: nothing left to wait for). A store that raised holds no
page any more (its copies were done or abandoned)."""


def first_live_block(window: int | None, history: int, tokens_per_block: int) -> int:
    """The first block ordinal of a layer group of attention ``window`` (None: full) whose page is
    surely still its own with ``history`` tokens computed (one behind the manager under the overlap
    scheduler): its pages turn ``-1`` once the window passes them, and no delta says so."""
    return 0 if window is None else max(0, (history + 2 - window) // tokens_per_block)


def copies_done(future: Future[Any]) -> bool:
    """Whether a save's store has run and its copies are done (never raises: a failed save is a miss)."""
    if not future.done():
        return False
    return future.exception() is not None or event_done(future.result())()


@dataclass
class _Tracked:
    save_id: int
    first_page_end: int
    window: int


class WindowFences:
    """Scheduler side: the sliding-group saves of each request whose pages are not passed yet."""

    def __init__(self, tokens_per_block: int, windows: Callable[[], list[int | None]]) -> None:
        """``windows``: per layer group, its attention window in tokens (None: full attention)."""
        self._tpb = tokens_per_block
        self._windows = windows
        self._next_id = 0
        self._tracked: dict[int, list[_Tracked]] = {}

    def begin(self, meta: ConnectorMetadata) -> None:
        """An iteration's metadata: its saves are numbered from here."""
        meta.first_save_id = self._next_id

    def planned(self, meta: ConnectorMetadata, request_id: int) -> None:
        """``meta.saves[-1]`` was just planned for ``request_id``: numbered, and tracked if its group
        slides."""
        self._next_id = meta.first_save_id + len(meta.saves)
        save = meta.saves[-1]
        windows = self._windows()
        window = windows[save.group] if save.group < len(windows) else None
        if window is None:
            return
        first_page_end = (save.start // self._tpb + 1) * self._tpb
        self._tracked.setdefault(request_id, []).append(_Tracked(self._next_id - 1, first_page_end, window))

    def computed(self, meta: ConnectorMetadata, request_id: int, tokens: int) -> None:
        """The request has ``tokens`` computed once this iteration's forward is done: its saves whose
        first page may be freed before the next forward go into ``meta.fence_saves``."""
        tracked = self._tracked.get(request_id)
        if not tracked:
            return
        kept = []
        for save in tracked:
            if save.first_page_end <= tokens + 1 - save.window + self._tpb:
                meta.fence_saves.append(save.save_id)
            else:
                kept.append(save)
        if kept:
            self._tracked[request_id] = kept
        else:
            del self._tracked[request_id]

    def forget(self, request_id: int) -> None:
        """The request ended or starts afresh: TRT-LLM frees its pages only once its saves landed."""
        self._tracked.pop(request_id, None)


class WindowSaves:
    """Worker side: the copies of sliding-group saves, by save id, until fenced or done."""

    def __init__(self) -> None:
        self._pending: dict[int, SaveCopies] = {}
        self.windowed_groups: set[int] = set()
        """The layer groups with a sliding window (from the registered pools)."""

    def add(self, save_id: int, group: int, copies: SaveCopies) -> None:
        if group in self.windowed_groups:
            self._pending[save_id] = copies

    def order(
        self, save_ids: Iterable[int], stream: Any, device: torch.device, fence: SaveFence | None
    ) -> None:
        """Order ``stream`` (None: ``device``'s current one) after the named saves' copies. ``fence``:
        this iteration's saves' start, released first when a save still has to run (one of this very
        iteration's may be among them; its copies then follow the forward only)."""
        for save_id in save_ids:
            copies = self._pending.pop(save_id, None)
            if copies is None or all(copies_done(future) for future in copies):
                continue
            if fence is not None:
                fence.release(None)
            for future in copies:
                if future.exception() is not None:  # blocks until the store has run
                    continue
                event = future.result()
                if event is None or event.query():
                    continue
                if stream is None:  # an event: the pools are on a CUDA device
                    stream = torch.cuda.current_stream(device)
                stream.wait_event(event)
        self._pending = {
            k: copies for k, copies in self._pending.items() if not all(map(copies_done, copies))
        }
