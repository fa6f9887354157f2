"""TRT-LLM's own connector scenarios (reference §6.2 and the manager unit tests), replayed.

Each scenario runs with the overlap scheduler off and on; ``ov`` is 1 when it is on.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from lmcache.testing.trtllm_replay import (
    CppRequestView,
    KvCacheConfig,
    KvCacheConnectorConfig,
    KvCacheConnectorManager,
    LlmRequest,
    ModelConfig,
    RecordingConnector,
    ReplayExecutor,
    TorchLlmArgs,
)
from lmcache.testing.trtllm_replay import recording as recording_module

L = 3  # layers of the scenario model
MODEL = ModelConfig(vocab_size=256, hidden_size=32, num_layers=L, num_heads=4, num_kv_heads=2, head_dim=8)
HELLO = [15496, 11, 995, 0]  # "Hello, world"-sized prompt (4 tokens), reduced mod vocab below
HELLO = [t % MODEL.vocab_size for t in HELLO]


def make(
    rec: RecordingConnector,
    overlap: bool,
    *,
    tokens_per_block: int = 32,
    max_tokens: int | None = None,
    chunked: bool = False,
    max_num_tokens: int = 8192,
    tp: int = 1,
    **kwargs,
) -> ReplayExecutor:
    args = TorchLlmArgs(
        model="replay-scenarios",
        tensor_parallel_size=tp,
        kv_cache_config=KvCacheConfig(tokens_per_block=tokens_per_block, max_tokens=max_tokens),
        enable_chunked_prefill=chunked,
        max_num_tokens=max_num_tokens,
    )
    return ReplayExecutor(args, MODEL, overlap_scheduler=overlap, connector=rec.factories(), **kwargs)


def prompt(n: int, start: int = 1) -> list[int]:
    return [(start + 7 * i) % MODEL.vocab_size for i in range(n)]


def summary(data) -> tuple[int, int, list[int], int, int]:
    return (
        data.request_id,
        len(data.new_tokens),
        list(data.new_block_ids),
        data.computed_position,
        data.num_scheduled_tokens,
    )


overlap_modes = pytest.mark.parametrize("overlap", [False, True], ids=["no_overlap", "overlap"])


@overlap_modes
def test_simple(overlap: bool) -> None:
    ov, T = int(overlap), 8
    rec = RecordingConnector()
    ex = make(rec, overlap)
    (result,) = ex.generate([HELLO], T)
    assert len(result.tokens) == T

    assert rec.count("register_kv_caches") == 1
    assert rec.count("wait_for_initialization") == 1
    assert rec.count("get_num_new_matched_tokens") == 1
    (alloc,) = rec.calls_of("update_state_after_alloc")
    assert len(alloc.args[1]) == 1
    for method in ("build_connector_meta", "bind_connector_meta", "start_load_kv", "wait_for_save"):
        assert rec.count(method) == T + ov, method
    for hook in ("wait_for_layer_load", "save_kv_layer"):
        assert [c.args[0] for c in rec.calls_of(hook)] == list(range(L)) * (T + ov)

    outputs = rec.scheduler_outputs
    assert len(outputs[0].new_requests) == 1 and not outputs[0].cached_requests
    for i, out in enumerate(outputs[1:], start=1):
        assert not out.new_requests and len(out.cached_requests) == 1
        expected_tokens = 0 if (overlap and i == 1) else 1
        assert len(out.cached_requests[0].new_tokens) == expected_tokens

    (finished,) = rec.calls_of("request_finished")
    assert len(finished.args[1]) == 1
    assert rec.count("get_finished") == T + ov
    assert all(c.args == ([], []) for c in rec.calls_of("get_finished"))

    # The exact per-iteration call order of §3.2.
    hooks = [m for i in range(L) for m in (f"wait_for_layer_load{i}", f"save_kv_layer{i}")]
    step = ["build_connector_meta", "bind_connector_meta", "start_load_kv", *hooks, "wait_for_save"]
    expected = ["get_num_new_matched_tokens", "update_state_after_alloc"]
    for it in range(T + ov):
        expected += step
        if it == T - 1 + ov:
            expected.append("request_finished")
        expected.append("get_finished")
    seen = [
        c.method + (str(c.args[0]) if c.method in ("wait_for_layer_load", "save_kv_layer") else "")
        for c in rec.calls
        if c.method not in ("__init__", "register_kv_caches", "wait_for_initialization")
    ]
    assert seen == expected


@overlap_modes
def test_async_onboard(overlap: bool) -> None:
    ov, T = int(overlap), 8
    rec = RecordingConnector(match=(16, True))
    ex = make(rec, overlap, tokens_per_block=16)
    (result,) = ex.generate([prompt(40)], T)
    assert len(result.tokens) == T and result.num_connector_matched_tokens == 16

    polls = rec.calls_of("get_finished")
    assert len(polls) == T + 1 + ov
    assert polls[0].args == ([], [result.request_id])
    assert all(c.args == ([], []) for c in polls[1:])
    # Matched and allocated once; the request is skipped while loading, then reported once as new
    # with computed_position including the loaded tokens and all its tokens and blocks.
    assert rec.count("get_num_new_matched_tokens") == 1 and rec.count("update_state_after_alloc") == 1
    outputs = rec.scheduler_outputs
    assert not outputs[0].new_requests and not outputs[0].cached_requests
    (reentry,) = outputs[1].new_requests
    assert summary(reentry) == (
        result.request_id,
        40,
        rec.calls_of("update_state_after_alloc")[0].args[1],
        16,
        24,
    )
    assert all(not out.new_requests for out in outputs[2:])
    # Iteration 1 built metadata and started loads but ran no forward.
    assert rec.count("start_load_kv") == T + 1 + ov
    assert rec.count("wait_for_save") == T + ov


@overlap_modes
def test_async_save(overlap: bool) -> None:
    ov, T = int(overlap), 8
    rec = RecordingConnector(async_save=True)
    ex = make(rec, overlap)
    (result,) = ex.generate([HELLO], T)
    polls = rec.calls_of("get_finished")
    assert len(polls) == T + ov
    assert all(c.args == ([], []) for c in polls[:-1])
    assert polls[-1].args == ([result.request_id], [])
    assert not ex.block_manager.has_sequence(result.request_id)  # unpinned once saved


@overlap_modes
def test_scheduler_output(overlap: bool) -> None:
    ov, T = int(overlap), 32

    def match(request, num_computed):
        return (8, False) if request.request_id == 2 else (0, False)

    rec = RecordingConnector(match=match)
    ex = make(rec, overlap)
    (first,) = ex.generate([prompt(48)], T)
    (alloc,) = rec.calls_of("update_state_after_alloc")
    assert len(alloc.args[1]) == 2
    outputs = rec.scheduler_outputs
    (new,) = outputs[0].new_requests
    assert summary(new) == (first.request_id, 48, alloc.args[1], 0, 48)
    saw_new_block = False
    for i, out in enumerate(outputs[1:], start=1):
        (data,) = out.cached_requests
        assert len(data.new_tokens) == (0 if (overlap and i == 1) else 1)
        assert data.num_scheduled_tokens == 1
        new_block = (data.computed_position + ov) % 32 == 0
        assert len(data.new_block_ids) == (1 if new_block else 0), (i, data)
        saw_new_block |= new_block
    assert saw_new_block
    (finished,) = rec.calls_of("request_finished")
    assert len(finished.args[1]) == 3

    before = len(rec.scheduler_outputs)
    (second,) = ex.generate([prompt(48, start=100)], 4)
    assert second.num_connector_matched_tokens == 8
    (new,) = rec.scheduler_outputs[before].new_requests
    assert new.request_id == second.request_id and new.computed_position == 0
    assert new.num_scheduled_tokens == 40


@overlap_modes
def test_chunked_context(overlap: bool) -> None:
    ov, T = int(overlap), 8
    rec = RecordingConnector()
    ex = make(rec, overlap, chunked=True, max_num_tokens=128)
    (result,) = ex.generate([prompt(256)], T)
    (alloc,) = rec.calls_of("update_state_after_alloc")
    assert len(alloc.args[1]) == 8
    outputs = rec.scheduler_outputs
    (first,) = outputs[0].new_requests
    assert summary(first) == (result.request_id, 256, alloc.args[1], 0, 128)
    assert not outputs[1].new_requests
    (second,) = outputs[1].cached_requests
    assert summary(second) == (result.request_id, 0, [], 128, 128)
    decode = [out.cached_requests[0] for out in outputs[2:]]
    assert [len(d.new_tokens) for d in decode] == [0] * ov + [1] * (len(decode) - ov)
    assert len(outputs) == 2 + T - 1 + ov
    (finished,) = rec.calls_of("request_finished")
    assert len(finished.args[1]) == 9


@overlap_modes
def test_multi_request(overlap: bool) -> None:
    """max_tokens=120 (7 blocks of 16) with async saves: the 110-token request fits only after
    the first two requests' saves complete and their pinned blocks are released."""
    ex_box: list[ReplayExecutor] = []
    saving_at_third_match: list[list[int]] = []

    def match(request, num_computed):
        if request.prompt_len == 110:
            saving_at_third_match.append(sorted(ex_box[0].manager.saving))
        return 0, False

    rec = RecordingConnector(match=match, async_save=True, finished_delay=2)
    ex = make(rec, overlap, tokens_per_block=16, max_tokens=120)
    ex_box.append(ex)
    assert ex.kv_caches[0].shape[0] == 7
    a, b, c = ex.generate([prompt(40), prompt(40, start=3), prompt(110, start=5)], [4, 4, 2])
    assert len(c.tokens) == 2
    assert saving_at_third_match == [[]]
    saved = [c_.args[0] for c_ in rec.calls_of("get_finished") if c_.args[0]]
    assert sorted(sum(saved, [])) == [a.request_id, b.request_id, c.request_id]
    assert rec.count("request_finished") == 3


def test_pinned_blocks_block_admission_until_saved() -> None:
    """If the connector never reports the saves, the third request can never be admitted."""
    rec = RecordingConnector(async_save=True, echo=False)
    ex = make(rec, False, tokens_per_block=16, max_tokens=120, idle_timeout_s=0.3)
    with pytest.raises(RuntimeError, match="no progress"):
        ex.generate([prompt(40), prompt(40, start=3), prompt(110, start=5)], [4, 4, 2])
    assert rec.count("get_num_new_matched_tokens") == 2


@overlap_modes
def test_get_finished_intersection_across_ranks(overlap: bool) -> None:
    """An async save completes only when both TP ranks returned the id; each rank sees it once."""
    T = 4
    rec = RecordingConnector(async_save=True, finished_delay={0: 0, 1: 3})
    ex = make(rec, overlap, tp=2)
    (result,) = ex.generate([HELLO], T)
    for rank in (0, 1):
        polls = rec.calls_of("get_finished", rank=rank)
        assert len(polls) == T + int(overlap) + 3
        assert [p.args[0] for p in polls if p.args[0]] == [[result.request_id]]
    assert not ex.block_manager.has_sequence(result.request_id)


def test_rank_placement_and_broadcast() -> None:
    rec = RecordingConnector(match=(0, False))
    ex = make(rec, False, tp=2)
    ex.generate([HELLO], 3)
    assert {c.rank for c in rec.calls if c.role == "scheduler"} == {0}
    assert {c.rank for c in rec.calls_of("update_state_after_alloc")} == {0}
    for method in (
        "register_kv_caches",
        "bind_connector_meta",
        "start_load_kv",
        "wait_for_save",
        "get_finished",
    ):
        assert rec.count(method, rank=0) == rec.count(method, rank=1) > 0, method
    # Rank 1 binds an unpickled copy equal to rank 0's metadata.
    meta0 = [c.args[0] for c in rec.calls_of("bind_connector_meta", rank=0)]
    meta1 = [c.args[0] for c in rec.calls_of("bind_connector_meta", rank=1)]
    assert meta0 == meta1
    shapes = [c.args[0] for c in rec.calls_of("register_kv_caches")]
    heads_per_rank = MODEL.num_kv_heads // 2
    expected = (ex.block_manager.num_blocks, L, 2, heads_per_rank * 32 * MODEL.head_dim)
    assert shapes == [expected, expected]


@overlap_modes
def test_take_pending_load_removes_only_async_request(overlap: bool) -> None:
    def match(request, num_computed):
        return (16, True) if request.request_id == 1 else (0, False)

    rec = RecordingConnector(match=match)
    ex = make(rec, overlap, tokens_per_block=16)
    a, b = ex.generate([prompt(40), prompt(40, start=9)], 3)
    first = rec.scheduler_outputs[0]
    assert [d.request_id for d in first.new_requests] == [b.request_id]
    assert rec.calls_of("get_finished")[0].args == ([], [a.request_id])
    assert [len(r.tokens) for r in (a, b)] == [3, 3]


def test_zero_async_match_raises() -> None:
    rec = RecordingConnector(match=(0, True))
    ex = make(rec, False)
    with pytest.raises(RuntimeError, match=r"\(0, True\)"):
        ex.generate([HELLO], 2)


def test_generation_only_request_raises() -> None:
    rec = RecordingConnector()
    make(rec, False)
    manager = KvCacheConnectorManager(rec.scheduler, list(rec.workers.values()), tokens_per_block=32)
    req = LlmRequest(99, HELLO, 2)
    req.is_generation_only_request = True
    with pytest.raises(RuntimeError, match="generation-only"):
        manager.get_num_new_matched_tokens(req, 0)


def test_match_receives_cpp_view_without_py_attributes() -> None:
    seen: list[tuple[bool, int]] = []

    def match(request, num_computed):
        seen.append((hasattr(request, "py_request_id"), request.request_id))
        return 0, False

    rec = RecordingConnector(match=match)
    ex = make(rec, False)
    (result,) = ex.generate([HELLO], 2)
    assert seen == [(False, result.request_id)]
    view = CppRequestView(LlmRequest(5, HELLO, 1))
    assert view.get_tokens(0) == HELLO and view.prompt_len == 4
    with pytest.raises(AttributeError):
        _ = view.py_num_connector_matched_tokens


def test_cuda_graphs_skip_hooks_for_decode_only_batches() -> None:
    T = 5
    rec = RecordingConnector(forward_pass_callable=True)
    ex = make(rec, False, cuda_graphs=True)
    ex.generate([HELLO], T)
    assert rec.count("wait_for_layer_load") == L  # the context forward only
    assert rec.count("save_kv_layer") == L
    assert rec.count("forward_pass_callable") == T  # runs on graph replays too
    assert rec.count("wait_for_save") == T


def test_device_match_is_reported_to_connector() -> None:
    rec = RecordingConnector()
    ex = make(rec, False, tokens_per_block=16)
    p = prompt(50)
    ex.generate([p], 2)
    (again,) = ex.generate([p], 2)
    assert again.num_device_matched_tokens == 48
    second_match = rec.calls_of("get_num_new_matched_tokens")[1]
    assert second_match.args[1] == 48
    assert ex.stats.device_matched_tokens[again.request_id] == 48
    # First report of a device hit: computed_position is the device-matched count.
    reports = [
        d for out in rec.scheduler_outputs for d in out.new_requests if d.request_id == again.request_id
    ]
    assert [(d.computed_position, d.num_scheduled_tokens, len(d.new_tokens)) for d in reports] == [
        (48, 2, 50)
    ]


def test_salt_separates_device_reuse_and_is_reported() -> None:
    rec = RecordingConnector()
    ex = make(rec, False, tokens_per_block=16)
    p = prompt(50)
    ex.generate([p], 2, cache_salts=["tenant-a"])
    (other,) = ex.generate([p], 2, cache_salts=["tenant-b"])
    (same,) = ex.generate([p], 2, cache_salts=["tenant-a"])
    assert other.num_device_matched_tokens == 0 and same.num_device_matched_tokens == 48
    salts = [d.cache_salt for out in rec.scheduler_outputs for d in out.new_requests]
    assert salts == ["tenant-a", "tenant-b", "tenant-a"]
    hashes = {d.request_id: d.block_hashes for out in rec.scheduler_outputs for d in out.new_requests}
    assert hashes[1] == hashes[3] != hashes[2] and len(hashes[1]) == 3


def test_connector_classes_loaded_by_name_from_config() -> None:
    recorder = recording_module.DEFAULT_RECORDER
    recorder.calls.clear()
    args = TorchLlmArgs(
        kv_cache_config=KvCacheConfig(tokens_per_block=32),
        kv_connector_config=KvCacheConnectorConfig(
            connector_module="lmcache.testing.trtllm_replay.recording",
            connector_scheduler_class="RecordingScheduler",
            connector_worker_class="RecordingWorker",
        ),
    )
    ex = ReplayExecutor(args, MODEL)
    ex.generate([HELLO], 2)
    assert recorder.count("register_kv_caches") == 1 and recorder.count("build_connector_meta") == 2
    assert isinstance(ex.scheduler, recording_module.RecordingScheduler)


def test_connector_presets() -> None:
    cfg = KvCacheConnectorConfig(connector="lmcache-mp", server_url="tcp://localhost:5555")
    assert cfg.connector_module == "lmcache.integration.tensorrt_llm.tensorrt_mp_adapter"
    assert cfg.connector_worker_class == "LMCacheMPKvConnectorWorker"
    override = KvCacheConnectorConfig(connector="lmcache", connector_worker_class="Mine")
    assert override.connector_worker_class == "Mine"
    assert override.connector_scheduler_class == "LMCacheKvConnectorScheduler"
    with pytest.raises(ValueError, match="unknown connector preset"):
        KvCacheConnectorConfig(connector="nope")
    with pytest.raises(ValueError):
        KvCacheConnectorConfig(connector_module="x")


def test_metadata_must_be_picklable() -> None:
    class Unpicklable(recording_module.RecordingScheduler):
        def build_connector_meta(self, scheduler_output):
            return lambda: None

    rec = RecordingConnector()
    worker_factory = rec.factories()[1]
    ex = ReplayExecutor(
        TorchLlmArgs(), MODEL, connector=(lambda args: Unpicklable(args, recorder=rec), worker_factory)
    )
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        ex.generate([HELLO], 1)


def test_block_reuse_off_never_asks_connector() -> None:
    rec = RecordingConnector(match=(16, False))
    args = TorchLlmArgs(kv_cache_config=KvCacheConfig(tokens_per_block=16, enable_block_reuse=False))
    ex = ReplayExecutor(args, MODEL, connector=rec.factories())
    ex.generate([prompt(40)], 2)
    assert rec.count("get_num_new_matched_tokens") == 0
    assert rec.count("update_state_after_alloc") == 1


def test_pool_dtype_and_registration() -> None:
    rec = RecordingConnector()
    model = ModelConfig(
        vocab_size=256,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        dtype=torch.bfloat16,
    )
    ex = ReplayExecutor(TorchLlmArgs(), model, connector=rec.factories())
    (call,) = rec.calls_of("register_kv_caches")
    assert call.args[1] == torch.bfloat16
    assert ex.kv_caches[0].dtype == torch.bfloat16
    (result,) = ex.generate([HELLO], 3)
    assert len(result.tokens) == 3
