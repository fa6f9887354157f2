"""When the scheduler's lookup first asks about the prompt's first chunk alone.

A lookup hashes the whole prompt (the hashes then name its chunks in every load and save, D14),
which for a 16k-token prompt costs more than a round trip to the cache server. When most prompts
miss, asking first about the first chunk alone (one chunk hashed, no pins) answers a miss without
that hashing; through the server, the prompt's saves then send its tokens and the server hashes
them, outside TRT-LLM's process. When most prompts hit, that first question is asked again by the
full lookup: a round trip more through the server, and even where it is answered in this process
(the in-process engine's L1, the server's presence counts) work on the hit's critical path. So it
is only asked while the recent share of first-chunk hits is low.
"""

from __future__ import annotations

PROBE_MIN_CHUNKS = 8
"""Shorter prompts are hashed at once: a probe would cost more than it can save."""

HIT_RATE_LIMIT = 0.5
"""Probes are made while the recent share of lookups whose first chunk hit is below this."""

SMOOTHING = 1 / 16
"""Weight of the newest lookup in that share (about the last 16 lookups count)."""


class MissProbe:
    """The scheduler's running share of first-chunk hits, and whether the next lookup probes."""

    def __init__(self) -> None:
        self.hit_rate = 0.0
        """Recent share of lookups whose first chunk was cached (starts as if every lookup missed)."""

    def mostly_hit(self) -> bool:
        """Whether recent lookups mostly found their first chunk: then no lookup asks about it alone."""
        return self.hit_rate >= HIT_RATE_LIMIT

    def wanted(self, full_chunks: int) -> bool:
        """Whether a lookup of a prompt with ``full_chunks`` full chunks should probe the server first."""
        return full_chunks >= PROBE_MIN_CHUNKS and not self.mostly_hit()

    def record(self, first_chunk_hit: bool) -> None:
        """Count a lookup's outcome (a probe's, or a full lookup's first chunk)."""
        self.hit_rate += SMOOTHING * (float(first_chunk_hit) - self.hit_rate)
