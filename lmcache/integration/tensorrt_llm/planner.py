"""Scheduler-side bookkeeping for both presets: what to load and save, per request and reservation.

Rules it keeps (each one a bug in some connector before it):
- block-id lists stay indexed by block ordinal, ``-1`` (no page) in place; a chunk moves only
  where every block it needs has a page, and a ``-1`` never reaches a copy;
- loads are block-aligned, cover only ``[num_computed_tokens, hit)`` so blocks TRT-LLM reused are
  never rewritten, and never claim the last prompt token;
- hits are pinned at lookup (per request on the legacy path, per reservation id on V2's prefix
  reservations), so eviction cannot turn a promised load into garbage;
- on V2's reservation path, ``SchedulerOutput.prefix_loads`` is the only permission to load;
- every chunk fully computed by a forward is saved once, after that forward (chunked prefill steps
  and generated tokens included), from the pages it has then: a sliding window's pages read
  ``-1`` later, so a chunk is never saved late;
- no call order leaves a request's state or pins behind. A request with pages ends with
  ``request_finished`` (or ``request_reset``, then asked again). A request asked about before it
  has pages (V2's ``reserve_prefix`` in each pass while it waits; a speculative legacy query) may
  be cancelled with no callback at all, so its state (kept so that a request asked again is not
  hashed again; ``request_reset`` keeps only that) is forgotten once TRT-LLM stops asking
  (:mod:`~lmcache.integration.tensorrt_llm.waiting`). It holds no pins then: the pins of a
  reservation go with its last ``release_prefix_reservation``, those of a legacy offer with
  ``cancel_load``, and while either promise is open the state is kept.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any, Protocol

from lmcache.config import LMCacheEngineConfig
from lmcache.integration.tensorrt_llm.blocks import NO_PAGE, paged_runs, savable_runs
from lmcache.integration.tensorrt_llm.plan import (
    ConnectorMetadata,
    Found,
    LoadPlan,
    PinKey,
    Prompt,
    TargetId,
    Transfer,
)
from lmcache.integration.tensorrt_llm.request_state import (
    PendingLoad,
    RequestState,
    Reservation,
    reservation_pin,
    subtract_ranges,
)
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings, request_salt
from lmcache.integration.tensorrt_llm.waiting import WaitingRequests
from lmcache.integration.tensorrt_llm.window_fence import WindowFences, first_live_block
from lmcache.logging import init_logger

logger = init_logger(__name__)


class CacheIndex(Protocol):
    """The cache as the scheduler sees it (in-process engine or cache server), over every pool
    target the local workers registered; a target that cannot answer is a miss, never an error."""

    def hash_prompt(self, tokens: list[int], salt: Any) -> dict[TargetId, Any] | None:
        """The prompt's chunk hashes per target if loads and saves should name chunks by them."""
        ...

    def lookup(self, prompt: Prompt, pin: PinKey) -> Found:
        """Tokens of the longest prefix cached in every target for every rank, pinned under ``pin``
        (a miss pins nothing); with the prompt's hashes if this lookup computed them (a prompt given
        with ``hashes`` is not hashed again)."""
        ...

    def release(self, pin: PinKey) -> None: ...

    def metadata_context(self) -> Any:
        """What this iteration's workers need from rank 0 to load (see ``ConnectorMetadata``); once it
        returns, the pins of the pass's lookups are where every rank's load finds them."""
        ...

    def windows(self) -> list[int | None]:
        """Per layer group, its attention window in tokens (None: full attention)."""
        ...


def _refs_of_unshared_list() -> int:
    """What ``sys.getrefcount`` reports here for a list held by one local name alone (the count
    depends on the interpreter): a list returned to a caller that reports no more is no one else's."""
    tokens = list(range(2))
    return sys.getrefcount(tokens)


_UNSHARED_LIST_REFS = _refs_of_unshared_list()


def _log_match(log_prefix: str, request_id: int, prompt_len: int, computed: int, hit: int, new: int) -> None:
    logger.debug(
        "%s: req %d prompt=%d num_computed=%d lmcache_cached=%d new_matched=%d",
        log_prefix,
        request_id,
        prompt_len,
        computed,
        hit,
        new,
    )


class PromisedLoadError(RuntimeError):
    """A load TRT-LLM was promised cannot be carried out; the request must fail, not use its pages."""


class Planner:
    """Turns TRT-LLM's scheduler callbacks into ``ConnectorMetadata``."""

    def __init__(
        self,
        settings: ConnectorSettings,
        config: LMCacheEngineConfig,
        index: CacheIndex,
        log_prefix: str,
        waiting: WaitingRequests | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.index = index
        self.log_prefix = log_prefix
        self._requests: dict[int, RequestState] = {}
        self._reservations: dict[int, Reservation] = {}
        self._waiting = waiting if waiting is not None else WaitingRequests()
        """The states of requests without pages, forgotten once TRT-LLM stops asking about them."""
        self._fences = WindowFences(settings.tokens_per_block, index.windows)

    @property
    def _tpb(self) -> int:
        return self.settings.tokens_per_block

    @property
    def _chunk(self) -> int:
        return self.settings.chunk_size

    # -- lookups ------------------------------------------------------------------------------

    def _prompt_of(
        self, request: Any, hash_now: bool = False, *, borrow: bool = False
    ) -> tuple[Prompt, int, bool]:
        """The request's prompt with the hashes an earlier lookup computed (TRT-LLM asks again while it
        waits), else hashed now if ``hash_now`` (no lookup follows), else left to the lookup (which may
        find a miss unhashed); its length; and whether its tokens are a list the caller may still hold
        (``borrow``: a miss needs no copy), not ours (one no one else holds, as TRT-LLM builds, is)."""
        tokens = request.get_tokens(0)
        prompt_len = int(getattr(request, "prompt_len", len(tokens)) or len(tokens))
        whole = isinstance(tokens, list) and len(tokens) == prompt_len
        shared = not whole or sys.getrefcount(tokens) > _UNSHARED_LIST_REFS  # else ours as it is
        borrowed = shared and whole and borrow
        if shared and not borrowed:
            # One copy (never the caller's list): a list's slice is one; anything else is listed first.
            tokens = tokens[:prompt_len] if isinstance(tokens, list) else list(tokens)[:prompt_len]
        salt = request_salt(request)
        previous = self._requests.get(int(request.request_id))
        if (
            previous is not None
            and previous.prompt.hashes is not None
            and previous.prompt.salt == salt
            and previous.prompt.tokens == tokens
        ):
            return previous.prompt, prompt_len, False
        hashes = self.index.hash_prompt(tokens, salt) if hash_now and prompt_len > 1 else None
        return Prompt(tokens, salt, hashes), prompt_len, borrowed

    def _usable(
        self, prompt: Prompt, prompt_len: int, num_computed: int, pin: PinKey
    ) -> tuple[int, int, Prompt]:
        """(hit, tokens to load after ``num_computed``, the prompt with the hashes the lookup computed);
        the pins are dropped when nothing loads."""
        found = self.index.lookup(prompt, pin) if prompt_len > 1 else Found(0)
        if found.hashes is not None:
            prompt = replace(prompt, hashes=found.hashes)
        hit = found.hit
        # Never claim the last prompt token: TRT-LLM must compute it to sample.
        usable = min(hit, prompt_len - 1) // self._tpb * self._tpb
        new = usable - num_computed if usable > num_computed and num_computed % self._tpb == 0 else 0
        if num_computed % self._tpb:
            logger.debug(
                "%s: device match %d is not block-aligned; not loading", self.log_prefix, num_computed
            )
        if new and new < self.config.min_retrieve_tokens:
            new = 0
        if hit and not new:
            self.index.release(pin)  # a miss pinned nothing: no release (a round trip saved per miss)
        return hit, new, prompt

    def match(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """``get_num_new_matched_tokens``: look up, pin the hit under the request's id."""
        request_id = int(request.request_id)
        # Borrowed: a miss (most lookups) needs no copy; its state keeps it until the first report's tokens.
        prompt, prompt_len, borrowed = self._prompt_of(request, borrow=True)
        self._forget(request_id)
        hit, new, prompt = self._usable(prompt, prompt_len, num_computed_tokens, PinKey("req", request_id))
        if borrowed and (hit or prompt.hashes is not None):
            # Read after this call (a load's source, the hashes a repeated lookup reuses): our own copy.
            prompt = replace(prompt, tokens=prompt.tokens[:])
        state = self._requests[request_id] = RequestState(request_id, prompt, prompt_len)
        state.saved_until = hit // self._chunk * self._chunk
        if new:
            is_async = self.config.enable_async_loading
            state.load = PendingLoad(num_computed_tokens, num_computed_tokens + new, is_async)
        self._asked(state)
        _log_match(self.log_prefix, request_id, prompt_len, num_computed_tokens, hit, new)
        return new, bool(new) and self.config.enable_async_loading

    def cancel_load(self, request: Any, start: int, end: int) -> None:
        """Offered tokens ``[start, end)`` will not be consumed: trim the offer at its head or tail
        (:meth:`PendingLoad.cancel`), or drop it and release its pins once nothing is left to load."""
        state = self._requests.get(int(request.request_id))
        if state is None or state.load is None or state.load.planned:
            return
        state.load.cancel(start, end, state.request_id)
        if state.load.start >= state.load.end:
            self._drop_load(state)

    def _drop_load(self, state: RequestState) -> None:
        """Nothing of the request's legacy offer is left to load: its pins go."""
        state.load = None
        self.index.release(PinKey("req", state.request_id))

    # -- V2 prefix reservations ---------------------------------------------------------------

    def reserve(self, request: Any, num_computed_tokens: int, reservation_id: int) -> tuple[int, bool]:
        """``reserve_prefix``: pin the source of ``[num_computed_tokens, +n)``; start no transfer."""
        request_id = int(request.request_id)
        if reservation_id in self._reservations:
            raise ValueError(f"reservation id {reservation_id} is already in use; ids must be fresh")
        prompt, prompt_len, _ = self._prompt_of(request)
        pin = reservation_pin(reservation_id)
        hit, new, prompt = self._usable(prompt, prompt_len, num_computed_tokens, pin)
        state = self._requests.get(request_id)
        _log_match(self.log_prefix, request_id, prompt_len, num_computed_tokens, hit, new)
        if state is None and not new and prompt.hashes is None:
            return 0, False  # nothing worth keeping for the next ask
        if state is None or state.prompt.tokens != prompt.tokens:
            state = self._requests[request_id] = RequestState(request_id, prompt, prompt_len)
        elif state.prompt.hashes is None:
            state.prompt = prompt  # hashed by this lookup: the request's saves name chunks by hash
        found = hit // self._chunk * self._chunk  # not given pages yet: only this ask's hit is known cached
        state.saved_until = max(state.saved_until, found) if state.allocated else found
        is_async = bool(new) and self.config.enable_async_loading
        if new:
            start, end = num_computed_tokens, num_computed_tokens + new
            protected = [(start, end)]
            self._reservations[reservation_id] = Reservation(
                reservation_id, request_id, prompt, start, end, is_async, protected
            )
        self._asked(state)
        return new, is_async

    def release_reservation(self, reservation_id: int, start: int, end: int) -> None:
        """Drop protection of ``[start, end)``; the pins go once every part was released."""
        reservation = self._reservations.get(reservation_id)
        if reservation is None:
            return
        reservation.protected = subtract_ranges(reservation.protected, start, end)
        if not reservation.protected:
            del self._reservations[reservation_id]
            self.index.release(reservation.pin)

    def reservation_ids(self) -> list[int]:
        """Reservations still holding pins."""
        return sorted(self._reservations)

    # -- requests without pages -----------------------------------------------------------------

    def _asked(self, state: RequestState) -> None:
        """A lookup for a request TRT-LLM has not given pages yet: keep its state while it is asked."""
        if not state.allocated:
            self._waiting.asked(state.request_id)
            self._forget_stale()

    def _allocated(self, state: RequestState) -> None:
        state.allocated = True
        self._waiting.claimed(state.request_id)

    def _holds_promise(self, request_id: int) -> bool:
        """A legacy offer not cancelled, or a reservation not released: TRT-LLM ends those."""
        state = self._requests.get(request_id)
        if state is not None and state.load is not None:
            return True
        return any(r.request_id == request_id for r in self._reservations.values())

    def _forget_stale(self) -> None:
        for request_id in self._waiting.take_stale(self._holds_promise):
            logger.debug("%s: req %d is no longer asked about; forgetting it", self.log_prefix, request_id)
            self._forget(request_id)

    # -- allocation -----------------------------------------------------------------------------

    def after_alloc(
        self, request: Any, block_ids_by_group: list[list[int]], honoured: int | None = None
    ) -> None:
        """``update_state_after_alloc[_by_layer_group]``: the pages of this allocation, by ordinal;
        ``honoured``: under V2, how many tokens of a legacy offer TRT-LLM took (None: all)."""
        request_id = int(request.request_id)
        state = self._requests.get(request_id)
        if state is None:  # reservation path, or block reuse off: no lookup made the state
            prompt, prompt_len, _ = self._prompt_of(request, hash_now=True)
            state = self._requests[request_id] = RequestState(request_id, prompt, prompt_len)
        self._allocated(state)
        state.block_ids = [[int(b) for b in group] for group in block_ids_by_group]
        load = state.load
        if load is not None and not load.planned:
            self._clip_to_allocation(state, load, honoured)

    def _clip_to_allocation(self, state: RequestState, load: PendingLoad, honoured: int | None) -> None:
        """V2's legacy query may honour an offer partly or not at all, with no ``cancel_load`` (a
        failed grow keeps the largest whole block inside the chunk's pages; the clamp to
        ``prompt_len - 1`` may end inside a block): only the honoured tokens load, within the
        allocation (the first report's count excludes exactly them); none left drops the load (an
        async one is still reported finished: TRT-LLM parks the request whatever it honoured)."""
        offered = load.end
        load.honour(honoured, min((len(group) for group in state.block_ids), default=0) * self._tpb)
        if load.end < offered:
            logger.debug("%s: req %d: honoured up to %d", self.log_prefix, state.request_id, load.end)
        if load.start >= load.end:
            self._drop_load(state)

    # -- build_connector_meta -----------------------------------------------------------------

    def build(self, scheduler_output: Any) -> ConnectorMetadata:
        """``build_connector_meta``, once per scheduling pass."""
        meta = ConnectorMetadata(backend_context=self.index.metadata_context())
        self._fences.begin(meta)
        for prefix_load in getattr(scheduler_output, "prefix_loads", None) or []:
            meta.loads.append(self._prefix_load(prefix_load))
        for data in getattr(scheduler_output, "new_requests", []) or []:
            self._on_report(data, first=True, meta=meta)
        for data in getattr(scheduler_output, "cached_requests", []) or []:
            self._on_report(data, first=False, meta=meta)
        # Legacy loads come from the alloc feedback: async-loading requests are not in the output.
        # Marked planned once all are: a load refused here leaves every offer the scheduler's (its
        # pins go when its request ends), none stranded as handed to workers that never got it.
        planned = [
            (state.load, self._load_plan(state, PinKey("req", state.request_id), state.load, None))
            for state in self._requests.values()
            if state.load is not None and not state.load.planned and state.block_ids
        ]
        for load, plan in planned:
            meta.loads.append(plan)
            load.planned = True
        self._waiting.end_pass()
        self._forget_stale()
        return meta

    def _prefix_load(self, prefix_load: Any) -> LoadPlan:
        reservation_id = int(prefix_load.reservation_id)
        reservation = self._reservations.get(reservation_id)
        start, end = int(prefix_load.start), int(prefix_load.end)
        if reservation is None or not reservation.start <= start <= end <= reservation.end:
            raise PromisedLoadError(
                f"TRT-LLM asked to load tokens [{start}, {end}) under reservation {reservation_id}, "
                "which this connector did not reserve (or already released); refusing to load"
            )
        request_id = int(prefix_load.request_id)
        state = self._requests.get(request_id)
        if state is None:
            state = self._requests[request_id] = RequestState(
                request_id, reservation.prompt, len(reservation.prompt.tokens)
            )
        self._allocated(state)
        state.block_ids = [[int(b) for b in group] for group in prefix_load.block_ids_by_layer_group]
        load = state.load = PendingLoad(start, end, bool(prefix_load.is_async), planned=True)
        return self._load_plan(state, reservation.pin, load, reservation_id, reservation.prompt)

    def _load_plan(
        self,
        state: RequestState,
        pin: PinKey,
        load: PendingLoad,
        reservation_id: int | None,
        prompt: Prompt | None = None,
    ) -> LoadPlan:
        """One transfer per paged run of each layer group: a sliding window's passed blocks read
        ``-1`` and need no KV (its sink blocks before them keep their pages and are loaded). A page
        missing in a group ``CacheIndex.windows`` names full attention, or a block list too short,
        fails the load before any copy. Transfers move whole blocks: a load ending inside a block
        fills all of it (TRT-LLM computes the block's rest, after the load, over the same tokens' KV),
        and so does one starting inside a block (see :meth:`PendingLoad.cancel`).
        """
        source = (prompt or state.prompt).up_to(load.end, self._chunk)
        first, last = load.start // self._tpb, -(-load.end // self._tpb)
        windows = self.index.windows()
        transfers = []
        for group, block_ids in enumerate(state.block_ids):
            runs = paged_runs(block_ids, first, last)
            full_attention = group >= len(windows) or windows[group] is None  # unknown: strict
            if runs is None or (full_attention and sum(hi - lo for lo, hi in runs) < last - first):
                raise PromisedLoadError(
                    f"request {state.request_id}: layer group {group} has no page for some block of the "
                    f"promised tokens [{load.start}, {load.end}) (block ids {block_ids[first:last]}); "
                    "refusing to load"
                )
            for lo, hi in runs:
                transfers.append(
                    Transfer(state.request_id, source, group, block_ids, lo * self._tpb, hi * self._tpb)
                )
        return LoadPlan(
            state.request_id,
            pin,
            transfers,
            load.start,
            load.end,
            load.is_async,
            state.prompt_len - load.start,
            reservation_id,
        )

    def _on_report(self, data: Any, first: bool, meta: ConnectorMetadata) -> None:
        request_id = int(data.request_id)
        # Taken as they are: converting each token in Python would cost the forward path more than
        # the rest of this call; hashing takes any integer type and rejects anything else. A list is
        # not even copied (TRT-LLM builds one per report): the request's state shares it until it grows.
        new_tokens = getattr(data, "new_tokens", None) or []
        if type(new_tokens) is not list:
            new_tokens = list(new_tokens)
        by_group = getattr(data, "new_block_ids_by_layer_group", None) or []
        new_blocks = (
            [list(map(int, group)) for group in by_group]
            if by_group
            else [list(map(int, getattr(data, "new_block_ids", None) or []))]
        )
        state = self._requests.get(request_id)
        if state is None or (first and state.reported):
            # No lookup happened (block reuse off) or the request was replayed: start afresh.
            state = RequestState(request_id, Prompt([], request_salt(data)), len(new_tokens))
            self._requests[request_id] = state
        self._allocated(state)
        if first:
            state.adopt(new_tokens)
            state.block_ids = new_blocks
        else:
            state.extend(new_tokens)
            while len(state.block_ids) < len(new_blocks):
                state.block_ids.append([])
            for group, blocks in enumerate(new_blocks):
                state.block_ids[group].extend(blocks)
        computed_position = int(getattr(data, "computed_position", 0) or 0)
        scheduled = getattr(data, "num_scheduled_tokens", None)
        if scheduled is None:
            # TRT-LLM before 1.2.0rc2 does not say how far this step computes: a context step computes
            # the rest of the prompt, unless prefill is chunked: then only what earlier steps computed
            # is known (the prompt's last chunks are saved at its first decode step).
            chunked = self.settings.chunked_prefill
            scheduled = 0 if chunked else max(1, state.prompt_len - computed_position)
        if first and state.load is not None and not state.load.is_async:
            computed_position += state.load.end - state.load.start  # TRT-LLM's count excludes it
        state.reported = True
        paged = min((len(group) for group in state.block_ids), default=0) * self._tpb
        computed = min(computed_position + int(scheduled), len(state.tokens), paged)
        self._plan_save(state, computed_position, computed, meta)
        self._fences.computed(meta, request_id, computed)

    def _plan_save(self, state: RequestState, history: int, computed: int, meta: ConnectorMetadata) -> None:
        chunk = self._chunk
        limit = computed if self.config.save_decode_cache else min(computed, state.prompt_len)
        end = limit // chunk * chunk
        if self.config.save_unfull_chunk and limit == state.prompt_len and not state.tail_saved:
            end = limit  # the prompt's partial last chunk; the engine keeps its whole blocks
        if end <= state.saved_until:
            return
        hashed = state.prompt_len // chunk * chunk  # the lookup hashed the prompt's full chunks
        hashes = state.prompt.hashes if end <= hashed else None
        prompt = Prompt(state.tokens_through(end), state.prompt.salt, hashes)
        windows = self.index.windows()
        for group, block_ids in enumerate(state.block_ids):
            live_from = first_live_block(windows[group] if group < len(windows) else None, history, self._tpb)
            live = [NO_PAGE] * live_from + block_ids[live_from:] if live_from else block_ids
            for start, stop in savable_runs(live, state.saved_until, end, chunk, self._tpb):
                meta.saves.append(Transfer(state.request_id, prompt, group, block_ids[:], start, stop))
                self._fences.planned(meta, state.request_id)
                state.save_planned = True
        # Past these chunks for good: a page a window took since never comes back.
        state.saved_until = end // chunk * chunk if end % chunk else end
        state.tail_saved = state.tail_saved or end % chunk != 0

    # -- request end ----------------------------------------------------------------------------

    def finished(self, request: Any) -> bool:
        """Forget the request; True while its saves or its async load may still use its blocks (TRT-LLM
        keeps them until the worker reports the id, once both landed; see ``RequestState.loading``)."""
        request_id = int(request.request_id)
        state = self._requests.get(request_id)
        self._forget(request_id)
        return state is not None and (state.save_planned or state.loading)

    def reset(self, request: Any) -> None:
        """``request_reset``: the request's pages now belong to someone else; it starts afresh, its
        prompt's hashes kept for the next ask (a failed admission resets a request that still waits)."""
        request_id = int(request.request_id)
        state = self._requests.get(request_id)
        self._forget(request_id)
        if state is not None and state.prompt.hashes is not None:
            fresh = self._requests[request_id] = RequestState(request_id, state.prompt, state.prompt_len)
            self._asked(fresh)

    def pending_requests(self) -> list[int]:
        return sorted(self._requests)

    def _forget(self, request_id: int) -> None:
        self._waiting.claimed(request_id)
        self._fences.forget(request_id)
        state = self._requests.pop(request_id, None)
        if state is not None and state.load is not None and not state.load.planned:
            self.index.release(PinKey("req", request_id))
