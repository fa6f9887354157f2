"""KVCacheManagerV2 with pages running short (``ReplayExecutor(serve_grow_pages=...)``): the grow
that a served connector prefix needs fails, and TRT-LLM honours the prefix only partly (largest
whole block inside the chunk's own pages, else nothing; reference §5.1), on the legacy query path
(no ``cancel_load``: the connector sees the allocation) and on the reservation path (the clipped
tail released before dispatch). Output bit-equal to a run without a connector, loads only of the
honoured range, nothing pinned, reserved or planned left."""

from __future__ import annotations

import pytest
from support.e2e import MODEL, TPB, assert_same_output, prompt
from support.presets import Preset

from lmcache.integration.tensorrt_llm.plan import ConnectorMetadata, LoadPlan
from lmcache.testing.trtllm_replay import KvCacheConnectorConfig, ReplayExecutor, TorchLlmArgs, llm_args_for

PROMPT = prompt(250, start=21)
CACHED = 192  # whole 64-token chunks of the 250-token prompt


def args(preset: Preset | None, mode: str, chunk: int | None) -> TorchLlmArgs:
    connector = (
        None
        if preset is None
        else KvCacheConnectorConfig(connector=preset.name, server_url=preset.server_url)
    )
    return llm_args_for(
        mode, connector, model="replay/qwen-like", tokens_per_block=TPB, max_tokens=2048, chunk=chunk
    )


def record_loads(executor: ReplayExecutor) -> list[LoadPlan]:
    """Every load the connector's scheduler plans, as it plans it."""
    planner, loads = executor.scheduler.planner, []
    build = planner.build

    def recording_build(scheduler_output: object) -> ConnectorMetadata:
        meta = build(scheduler_output)
        loads.extend(meta.loads)
        return meta

    planner.build = recording_build
    return loads


def finish(preset: Preset, executor: ReplayExecutor) -> None:
    assert executor.scheduler.planner.reservation_ids() == []
    assert executor.scheduler.planner.pending_requests() == []
    assert preset.pinned() == 0


def check_partial_honour(
    preset: Preset,
    mode: str,
    chunk: int,
    grow_pages: int,
    honoured: int,
    overlap: bool = False,
    is_async: bool = False,
) -> None:
    """The prompt cached by a first executor, then sent to one whose pages run short."""
    ReplayExecutor(args(preset, mode, chunk), MODEL).generate([PROMPT], 4)
    executor = ReplayExecutor(
        args(preset, mode, chunk), MODEL, overlap_scheduler=overlap, serve_grow_pages=grow_pages
    )
    loads = record_loads(executor)
    got = executor.generate([PROMPT], 4)[0]
    assert got.num_connector_matched_tokens == honoured
    assert [(load.start, load.end) for load in loads] == ([(0, honoured)] if honoured else [])
    assert all(t.end <= honoured for load in loads for t in load.transfers)
    assert all(load.is_async == is_async for load in loads)
    want = ReplayExecutor(args(None, mode, chunk), MODEL).generate([PROMPT], 4)[0]
    assert_same_output(got, want)
    finish(preset, executor)


@pytest.mark.parametrize("mode", ["v2", "v2-res"])
@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
@pytest.mark.parametrize(
    ("chunk", "grow_pages", "honoured"),
    [(64, 0, 48), (64, 11, 48), (16, 0, 0), (64, 12, CACHED)],
    ids=["last-block-kept", "one-page-short", "nothing-left", "enough-pages"],
)
def test_a_prefix_honoured_partly_when_pages_run_short(
    preset: Preset, mode: str, overlap: bool, chunk: int, grow_pages: int, honoured: int
) -> None:
    """Chunked prefill of 64 (16) tokens, 192 of 250 tokens cached: serving them needs 12 pages
    beyond the 4 (1) of the first chunk (legacy: ``[0, 64)``; reservations charge only the 58
    tokens after the prefix: ``[0, 58)``). Short of that, only ``[0, 48)`` (nothing) is honoured
    and loaded."""
    check_partial_honour(preset, mode, chunk, grow_pages, honoured, overlap)


@pytest.mark.parametrize("mode", ["v2", "v2-res"])
@pytest.mark.parametrize(("chunk", "honoured"), [(64, 48), (16, 0)], ids=["last-block-kept", "nothing-left"])
def test_an_async_prefix_honoured_partly(
    preset: Preset, lmcache_env: pytest.MonkeyPatch, mode: str, chunk: int, honoured: int
) -> None:
    """Async loading: TRT-LLM parks the request whatever it honoured (legacy path: even nothing),
    so the connector reports it finished with only the honoured blocks loaded, or none."""
    lmcache_env.setenv("LMCACHE_ENABLE_ASYNC_LOADING", "True")
    check_partial_honour(preset, mode, chunk, 0, honoured, is_async=True)
