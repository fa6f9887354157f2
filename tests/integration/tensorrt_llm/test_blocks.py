"""Block-ordinal arithmetic (``blocks.py``) against the rules spelled out one ordinal at a time."""

from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache.integration.tensorrt_llm.blocks import NO_PAGE, has_pages, paged_runs, savable_runs

BLOCK_LISTS = st.lists(st.one_of(st.just(NO_PAGE), st.integers(0, 50)), max_size=40)


def reference_runs(block_ids: list[int], first: int, last: int) -> list[tuple[int, int]] | None:
    if last > len(block_ids):
        return None
    runs: list[tuple[int, int]] = []
    for ordinal in range(first, last):
        if block_ids[ordinal] < 0:
            continue
        if runs and runs[-1][1] == ordinal:
            runs[-1] = (runs[-1][0], ordinal + 1)
        else:
            runs.append((ordinal, ordinal + 1))
    return runs


@settings(max_examples=300, deadline=None)
@given(block_ids=BLOCK_LISTS, first=st.integers(0, 45), length=st.integers(0, 45))
def test_pages_and_paged_runs_follow_each_ordinal(block_ids: list[int], first: int, length: int) -> None:
    last = first + length
    expected = last <= len(block_ids) and all(block_ids[i] >= 0 for i in range(first, last))
    assert has_pages(block_ids, first, last) is expected
    assert paged_runs(block_ids, first, last) == reference_runs(block_ids, first, last)


@settings(max_examples=300, deadline=None)
@given(
    block_ids=BLOCK_LISTS,
    start_chunk=st.integers(0, 10),
    length=st.integers(0, 48),
    tokens_per_block=st.sampled_from([1, 2, 4]),
    blocks_per_chunk=st.sampled_from([1, 2, 3]),
)
def test_savable_runs_are_whole_chunks_with_every_page(
    block_ids: list[int], start_chunk: int, length: int, tokens_per_block: int, blocks_per_chunk: int
) -> None:
    chunk = tokens_per_block * blocks_per_chunk
    start = start_chunk * chunk
    end = start + length
    expected: list[tuple[int, int]] = []
    for chunk_start in range(start, end, chunk):
        chunk_end = min(chunk_start + chunk, end)
        first, last = chunk_start // tokens_per_block, chunk_end // tokens_per_block
        if last > first and last <= len(block_ids) and all(block_ids[i] >= 0 for i in range(first, last)):
            if expected and expected[-1][1] == chunk_start:
                expected[-1] = (expected[-1][0], chunk_end)
            else:
                expected.append((chunk_start, chunk_end))
    assert savable_runs(block_ids, start, end, chunk, tokens_per_block) == expected
