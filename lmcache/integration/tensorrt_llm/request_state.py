"""The planner's state per request and per V2 prefix reservation: plain data with the few rules
that keep it consistent (a promised load trimmed only at its ends, a request's token list never
changed in place while a planned save holds it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lmcache.integration.tensorrt_llm.plan import PinKey, Prompt


@dataclass
class PendingLoad:
    """A promised load not yet handed to the workers (legacy path: from the lookup): tokens
    ``[start, end)``, which TRT-LLM counts as loaded. Both are block-aligned unless TRT-LLM honoured
    the offer up to a token inside a block (``honour``) or cancelled one of its ends there
    (``cancel``); the copies then fill that block whole."""

    start: int
    end: int
    is_async: bool
    planned: bool = False
    asked_at: int = field(init=False)
    """``start`` as offered (the query's ``num_computed_tokens``), where TRT-LLM counts the tokens
    it honours from; ``cancel_load`` may move ``start``, never this."""

    def __post_init__(self) -> None:
        self.asked_at = self.start

    def honour(self, honoured: int | None, allocated: int) -> None:
        """TRT-LLM took ``honoured`` tokens of the offer (None: all of it) and gave pages to the
        first ``allocated`` tokens: the load ends where the first of the two does (``start >= end``:
        nothing is left)."""
        end = min(self.end, allocated)
        if honoured is not None:
            end = min(end, self.asked_at + max(0, honoured))
        self.end = max(self.start, end)

    def cancel(self, start: int, end: int, request_id: int) -> None:
        """Tokens ``[start, end)`` will not be consumed: trim the head or the tail (or drop all of it);
        ``start >= end`` after it means nothing is left to load. TRT-LLM counts the rest as loaded to
        the token, so a cut may leave either end inside a block: the copies then fill that block whole
        (a block TRT-LLM's cache matched only part of is the request's own copy, and the same prefix's
        KV goes into its leading tokens again)."""
        if end <= self.start or start >= self.end:
            return
        if start <= self.start and end >= self.end:
            self.start = self.end
        elif start <= self.start:
            self.start = end
        elif end >= self.end:
            self.end = start
        else:
            raise ValueError(
                f"cancel_load({start}, {end}) would split request {request_id}'s offer "
                f"[{self.start}, {self.end}); only its head or tail can be cancelled"
            )


@dataclass
class RequestState:
    """One request as the planner knows it: its prompt as looked up, its tokens and pages so far,
    the load promised to it and how far its saves are planned."""

    request_id: int
    prompt: Prompt
    """The prompt as looked up (hashes included); ``tokens`` grows with generated tokens."""
    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    """Prompt and generated tokens: a list shared (the lookup's prompt's, a report's, a planned save's)
    until it grows, copied then: never changed in place while another holds it."""
    block_ids: list[list[int]] = field(default_factory=list)
    """Per layer group, indexed by block ordinal, ``-1`` in place."""
    load: PendingLoad | None = None
    saved_until: int = 0
    tail_saved: bool = False
    """The prompt's partial last chunk was planned for saving (``save_unfull_chunk``): never again."""
    save_planned: bool = False
    reported: bool = False
    allocated: bool = False
    """TRT-LLM gave the request pages: it ends the request with a callback."""
    tokens_shared: bool = True

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = self.prompt.tokens

    @property
    def loading(self) -> bool:
        """An async load was handed to the workers and TRT-LLM has not reported the request back since
        (it does once the load landed): the load may still be writing the request's blocks. TRT-LLM
        1.2 ends a request cancelled meanwhile at once, with no cache transceiver."""
        load = self.load
        return load is not None and load.is_async and load.planned and not self.reported

    def adopt(self, tokens: list[int]) -> None:
        """Take a report's token list as the request's tokens, without copying it (shared)."""
        self.tokens, self.tokens_shared = tokens, True

    def extend(self, tokens: Sequence[int]) -> None:
        """Append generated (or newly scheduled) tokens, to a list of our own."""
        if self.tokens_shared:
            self.tokens, self.tokens_shared = list(self.tokens), False
        self.tokens.extend(tokens)

    def tokens_through(self, end: int) -> list[int]:
        """``tokens[:end]`` for a planned save, which reads it later: the list itself (shared from
        now on) when that is all of it, so a long prompt's save copies nothing."""
        if end < len(self.tokens):
            return self.tokens[:end]
        self.tokens_shared = True
        return self.tokens


@dataclass
class Reservation:
    """A V2 prefix reservation: pins on the cache taken for ``[start, end)``, kept per id."""

    reservation_id: int
    request_id: int
    prompt: Prompt
    start: int
    end: int
    is_async: bool
    protected: list[tuple[int, int]] = field(default_factory=list)
    """The parts not yet released (``release_prefix_reservation`` takes them back piece by piece)."""

    @property
    def pin(self) -> PinKey:
        return reservation_pin(self.reservation_id)


def reservation_pin(reservation_id: int) -> PinKey:
    """The pins a V2 prefix reservation holds."""
    return PinKey("res", reservation_id)


def subtract_ranges(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """``ranges`` less ``[start, end)``."""
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if hi <= start or lo >= end:
            out.append((lo, hi))
            continue
        if lo < start:
            out.append((lo, start))
        if hi > end:
            out.append((end, hi))
    return out
