"""Block-ordinal arithmetic over TRT-LLM's block-id lists, where ``-1`` means "no page".

``-1`` is a valid Python and torch index (the last row, another request's page), so every range
handed to a copy is checked here first.
"""

from __future__ import annotations

from collections.abc import Sequence

NO_PAGE = -1


def has_pages(block_ids: Sequence[int], first: int, last: int) -> bool:
    """Whether ordinals ``[first, last)`` all exist in the list and have a page."""
    return last <= len(block_ids) and all(block_ids[i] >= 0 for i in range(first, last))


def paged_suffix_start(block_ids: Sequence[int], first: int, last: int) -> int | None:
    """The first ordinal of ``[first, last)`` from which every ordinal up to ``last`` has a page.

    A sliding-window group reports its oldest pages as ``-1``: only the paged suffix needs KV.
    Returns ``last`` when none of them has a page, and None for a hole (a page missing after a
    paged one) or a list shorter than ``last``: nothing can be loaded safely then.
    """
    if last > len(block_ids):
        return None
    start = first
    while start < last and block_ids[start] < 0:
        start += 1
    return start if all(block_ids[i] >= 0 for i in range(start, last)) else None


def savable_runs(
    block_ids: Sequence[int], start: int, end: int, chunk_size: int, tokens_per_block: int
) -> list[tuple[int, int]]:
    """Maximal token ranges inside ``[start, end)`` whose chunks have a page for every block.

    ``start`` is chunk-aligned; ranges are made of whole chunks, except that the last one may end
    at ``end`` when ``end`` is not chunk-aligned (a partial last chunk: only its whole blocks need
    pages, and only they are saved).
    """
    runs: list[tuple[int, int]] = []
    chunk_start = start
    while chunk_start < end:
        chunk_end = min(chunk_start + chunk_size, end)
        first, last = chunk_start // tokens_per_block, chunk_end // tokens_per_block
        if last > first and has_pages(block_ids, first, last):
            if runs and runs[-1][1] == chunk_start:
                runs[-1] = (runs[-1][0], chunk_end)
            else:
                runs.append((chunk_start, chunk_end))
        chunk_start += chunk_size
    return runs
