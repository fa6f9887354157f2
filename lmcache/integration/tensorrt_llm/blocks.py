"""Block-ordinal arithmetic over TRT-LLM's block-id lists, where ``-1`` means "no page".

``-1`` is a valid Python and torch index (the last row, another request's page), so every range
handed to a copy is checked here first.
"""

from __future__ import annotations

from collections.abc import Sequence

NO_PAGE = -1


def has_pages(block_ids: Sequence[int], first: int, last: int) -> bool:
    """Whether ordinals ``[first, last)`` all exist in the list and have a page."""
    return last <= len(block_ids) and (first >= last or min(block_ids[first:last]) >= 0)


def paged_runs(block_ids: Sequence[int], first: int, last: int) -> list[tuple[int, int]] | None:
    """The maximal ordinal ranges inside ``[first, last)`` whose every ordinal has a page, in order.

    A sliding-window group reports the blocks its window has passed as ``-1`` while its sink blocks
    before them keep their pages: only its paged runs need KV. None for a list shorter than ``last``
    (nothing can be loaded safely then).
    """
    if last > len(block_ids):
        return None
    if has_pages(block_ids, first, last):
        return [(first, last)] if first < last else []
    runs: list[tuple[int, int]] = []
    ordinal = first
    while ordinal < last:
        if block_ids[ordinal] < 0:
            ordinal += 1
            continue
        run_start = ordinal
        while ordinal < last and block_ids[ordinal] >= 0:
            ordinal += 1
        runs.append((run_start, ordinal))
    return runs


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
