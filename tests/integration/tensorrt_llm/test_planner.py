"""The planner's contract, driven directly (the executor replay tests drive it the way TRT-LLM does)."""

import pickle
from dataclasses import dataclass, field

import pytest
import torch

from lmcache.config import LMCacheEngineConfig
from lmcache.integration.tensorrt_llm._trtllm import RequestData, SchedulerOutput
from lmcache.integration.tensorrt_llm.plan import ConnectorMetadata, Found, PinKey, Prompt, TargetId, Transfer
from lmcache.integration.tensorrt_llm.planner import Planner
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings, request_salt
from lmcache.integration.tensorrt_llm.targets import targets_of_pool
from lmcache.transfer import BlockTransfer

TPB, CHUNK = 16, 64


@dataclass
class FakeIndex:
    """A cache that holds the first ``hit`` tokens of every prompt; records pins like the engine."""

    hit: int = 0
    lookups: list = field(default_factory=list)
    released: list = field(default_factory=list)
    pinned: set = field(default_factory=set)
    group_windows: list = field(default_factory=list)

    hashing: bool = False
    hashed: int = 0

    def digests(self, tokens):  # noqa: ANN001, ANN201
        """One fake 2-byte "digest" per full chunk, telling which prompt and chunk it names."""
        return {TargetId(0, 0): b"".join(bytes([len(tokens) % 251, i]) for i in range(len(tokens) // CHUNK))}

    def hash_prompt(self, tokens, salt):  # noqa: ANN001, ANN201
        self.hashed += 1
        return self.digests(tokens) if self.hashing else None

    def lookup(self, prompt, pin):  # noqa: ANN001, ANN201
        """Hashes a prompt given without hashes (as the server's index does), else checks them."""
        computed = None
        if prompt.hashes is None:
            computed = self.hash_prompt(prompt.tokens, prompt.salt)
        else:
            assert self.hashing and prompt.hashes == self.digests(prompt.tokens)
        self.lookups.append((len(prompt.tokens), prompt.salt, pin))
        hit = min(self.hit, len(prompt.tokens) // CHUNK * CHUNK)
        if hit:
            self.pinned.add(pin)
        return Found(hit, computed)

    def release(self, pin):  # noqa: ANN001, ANN201
        self.released.append(pin)
        self.pinned.discard(pin)

    def metadata_context(self):  # noqa: ANN201
        return None

    def windows(self):  # noqa: ANN201
        return self.group_windows


@dataclass
class FakeRequest:
    request_id: int
    tokens: list
    cache_salt: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.tokens)

    def get_tokens(self, beam: int) -> list:
        return self.tokens


def planner(hit: int = 0, **cfg: object) -> tuple[Planner, FakeIndex]:
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, **cfg)
    settings = ConnectorSettings("m", 1, TPB, CHUNK)
    index = FakeIndex(hit)
    return Planner(settings, config, index, "test"), index


def report(rid: int, tokens: list, blocks: list, pos: int, scheduled: int | None) -> RequestData:
    data = RequestData(request_id=rid, new_tokens=tokens, new_block_ids=blocks, computed_position=pos)
    data.num_scheduled_tokens = scheduled
    return data


def test_load_is_block_aligned_skips_device_match_and_last_token() -> None:
    p, index = planner(hit=192)
    req = FakeRequest(1, list(range(192)))
    n, is_async = p.match(req, 32)
    assert (n, is_async) == (176 - 32, False)  # hit 192 capped at prompt-1=191 -> 176 block-aligned
    p.after_alloc(req, [list(range(12))])
    meta = p.build(SchedulerOutput(new_requests=[report(1, req.tokens, list(range(12)), 32, 16)]))
    assert [(ld.start, ld.end) for ld in meta.loads] == [(32, 176)]
    assert [t.block_ids for t in meta.loads[0].transfers] == [list(range(12))]


def test_no_load_when_device_match_covers_hit_and_pins_released() -> None:
    p, index = planner(hit=128)
    assert p.match(FakeRequest(1, list(range(300))), 128) == (0, False)
    assert index.released == [PinKey("req", 1)]


def test_unaligned_device_match_is_not_loaded() -> None:
    p, _ = planner(hit=256)
    assert p.match(FakeRequest(1, list(range(300))), 40) == (0, False)


def test_min_retrieve_tokens_and_async_flag() -> None:
    p, _ = planner(hit=64, min_retrieve_tokens=100)
    assert p.match(FakeRequest(1, list(range(300))), 0) == (0, False)
    p, _ = planner(hit=128, enable_async_loading=True)
    assert p.match(FakeRequest(1, list(range(300))), 0) == (128, True)


def test_saves_follow_chunked_prefill_and_decode() -> None:
    p, _ = planner()
    prompt = list(range(150))
    p.match(FakeRequest(7, prompt), 0)
    blocks = list(range(10))
    p.after_alloc(FakeRequest(7, prompt), [blocks])
    m1 = p.build(SchedulerOutput(new_requests=[report(7, prompt, blocks, 0, 100)]))
    assert [(s.start, s.end) for s in m1.saves] == [(0, 64)]
    m2 = p.build(SchedulerOutput(cached_requests=[report(7, [], [], 100, 50)]))
    assert [(s.start, s.end) for s in m2.saves] == [(64, 128)]
    saves = []
    pos = 150
    for t in range(1000, 1060):  # decode: one token per step
        new_block = [pos // TPB] if pos % TPB == 0 else []  # a block is added as decode crosses one
        meta = p.build(SchedulerOutput(cached_requests=[report(7, [t], new_block, pos, 1)]))
        saves += [(s.start, s.end, len(s.prompt.tokens), len(s.block_ids)) for s in meta.saves]
        pos += 1
    assert saves == [(128, 192, 192, 12)]
    assert p.finished(FakeRequest(7, prompt)) is True


def test_the_callers_token_lists_are_never_grown() -> None:
    """The planner keeps the prompt and the reports' tokens without copying each token, but decode
    extends its own list: neither ``get_tokens``'s list nor a report's ``new_tokens`` changes."""
    for looked_up in (True, False):
        p, _ = planner()
        prompt = list(range(150))
        request = FakeRequest(7, prompt)
        if looked_up:
            p.match(request, 0)
        blocks = list(range(10))
        first = report(7, prompt, blocks, 0, 150)
        p.build(SchedulerOutput(new_requests=[first]))
        decoded = []
        for i, t in enumerate(range(1000, 1050)):
            step = report(7, [t], [10 + i // TPB] if (150 + i) % TPB == 0 else [], 150 + i, 1)
            decoded += [
                (s.start, s.end, s.prompt.tokens[-1])
                for s in p.build(SchedulerOutput(cached_requests=[step])).saves
            ]
        assert prompt == list(range(150)) and first.new_tokens == list(range(150))
        assert decoded == [(128, 192, 1000 + 191 - 150)]


def test_a_whole_prompts_save_shares_its_list_and_keeps_it_as_planned() -> None:
    """A save of every token the request has names the report's list itself (a 16k-token prompt's
    save copies nothing on the executor thread); decode then grows a list of the planner's own, so the
    planned save still names the tokens it was planned with."""
    p, _ = planner()
    prompt = list(range(128))
    first = report(7, prompt, list(range(8)), 0, 128)
    (save,) = p.build(SchedulerOutput(new_requests=[first])).saves
    assert (save.start, save.end) == (0, 128) and save.prompt.tokens is prompt
    pos, decode_saves = 128, []
    for t in range(1000, 1070):
        step = report(7, [t], [pos // TPB] if pos % TPB == 0 else [], pos, 1)
        decode_saves += p.build(SchedulerOutput(cached_requests=[step])).saves
        pos += 1
    assert save.prompt.tokens == list(range(128)) and prompt == list(range(128))
    # The decode save ends where the planner's own list did then: that list is shared from then on.
    assert [(s.start, s.end, s.prompt.tokens) for s in decode_saves] == [
        (128, 192, list(range(128)) + list(range(1000, 1064)))
    ]


def test_a_hit_loads_the_prompt_as_looked_up_whatever_the_caller_does_with_its_list() -> None:
    """A lookup reads ``get_tokens``'s list without copying it; a hit keeps a copy of its own, so a
    caller reusing that list afterwards cannot change which tokens the load names."""
    p, _ = planner(hit=128)
    prompt = list(range(150))
    request = FakeRequest(3, prompt)
    assert p.match(request, 0) == (128, False)
    prompt[:] = [9] * 150
    p.after_alloc(request, [list(range(10))])
    meta = p.build(SchedulerOutput(new_requests=[report(3, list(range(150)), list(range(10)), 0, 22)]))
    assert [t.prompt.tokens for ld in meta.loads for t in ld.transfers] == [list(range(128))]


class SliceCountingList(list):
    """A token list that counts the copies made of it by slicing (the planner's only way)."""

    slices = 0

    def __getitem__(self, index):  # noqa: ANN001, ANN204
        if isinstance(index, slice):
            SliceCountingList.slices += 1
        return super().__getitem__(index)


@dataclass
class FreshListRequest(FakeRequest):
    """``get_tokens`` builds a new list per call, as TRT-LLM's binding does."""

    def get_tokens(self, beam: int) -> list:
        return SliceCountingList(self.tokens)


def test_a_hit_copies_the_prompt_only_if_someone_else_holds_the_list() -> None:
    """On a hit the planner keeps the prompt for the load: a list only the lookup references (TRT-LLM's
    ``get_tokens``) is kept as it is, no copy of a long prompt inside ``get_num_new_matched_tokens``;
    a list the request keeps is copied (the caller may reuse it)."""
    for request, copies in (
        (FreshListRequest(3, list(range(150))), 0),
        (FakeRequest(3, SliceCountingList(range(150))), 1),
    ):
        p, _ = planner(hit=128)
        SliceCountingList.slices = 0
        assert p.match(request, 0) == (128, False)
        assert SliceCountingList.slices == copies
        p.after_alloc(request, [list(range(10))])
        meta = p.build(SchedulerOutput(new_requests=[report(3, list(range(150)), list(range(10)), 0, 22)]))
        assert [t.prompt.tokens for ld in meta.loads for t in ld.transfers] == [list(range(128))]


def test_a_miss_saves_the_tokens_its_first_report_brings() -> None:
    """A miss keeps no copy of the prompt: its saves name the tokens of the request's first report,
    whatever becomes of the list the lookup read."""
    p, _ = planner()
    prompt = list(range(150))
    assert p.match(FakeRequest(2, prompt), 0) == (0, False)
    prompt[:] = [9] * 150
    meta = p.build(SchedulerOutput(new_requests=[report(2, list(range(150)), list(range(10)), 0, 150)]))
    assert [(s.start, s.end, s.prompt.tokens) for s in meta.saves] == [(0, 128, list(range(128)))]


def test_loads_and_the_prompts_saves_carry_the_lookups_chunk_hashes() -> None:
    p, index = planner(hit=128)
    index.hashing = True
    prompt = list(range(150))  # 2 full chunks hashed at lookup
    req = FakeRequest(4, prompt)
    hashes = index.digests(prompt)
    assert p.match(req, 0) == (128, False)
    p.after_alloc(req, [list(range(10))])
    meta = p.build(SchedulerOutput(new_requests=[report(4, prompt, list(range(10)), 0, 22)]))
    assert [t.prompt.hashes for ld in meta.loads for t in ld.transfers] == [hashes]
    saves = []
    pos = 150
    for t in range(1000, 1060):  # decode fills the chunk [128, 192): beyond the hashed prompt
        new_block = [pos // TPB] if pos % TPB == 0 else []
        meta = p.build(SchedulerOutput(cached_requests=[report(4, [t], new_block, pos, 1)]))
        saves += meta.saves
        pos += 1
    assert [(s.start, s.end, s.prompt.hashes) for s in saves] == [(128, 192, None)]
    q, index = planner()
    index.hashing = True
    q.match(FakeRequest(5, prompt), 0)
    meta = q.build(SchedulerOutput(new_requests=[report(5, prompt, list(range(10)), 0, 150)]))
    assert [(s.start, s.end, s.prompt.hashes) for s in meta.saves] == [(0, 128, hashes)]


def test_a_request_asked_about_again_is_not_hashed_again() -> None:
    p, index = planner(hit=128)
    index.hashing = True
    prompt = list(range(150))
    for _ in range(3):  # TRT-LLM retries while the request waits for free blocks
        assert p.match(FakeRequest(6, prompt), 0) == (128, False)
    assert index.hashed == 1 and len(index.lookups) == 3
    p.match(FakeRequest(6, prompt, cache_salt="other"), 0)
    p.match(FakeRequest(7, prompt), 0)
    assert index.hashed == 3


def test_sync_hit_first_report_excludes_loaded_tokens() -> None:
    p, _ = planner(hit=128)
    prompt = list(range(200))
    req = FakeRequest(3, prompt)
    assert p.match(req, 0) == (128, False)
    p.after_alloc(req, [list(range(13))])
    # TRT-LLM reports computed_position without the connector's tokens: 0, then 72 scheduled.
    meta = p.build(SchedulerOutput(new_requests=[report(3, prompt, list(range(13)), 0, 72)]))
    assert [(s.start, s.end) for s in meta.saves] == [(128, 192)]  # hit chunks are not saved again


def test_save_decode_cache_off_stops_at_prompt() -> None:
    p, _ = planner(save_decode_cache=False)
    prompt = list(range(100))
    p.match(FakeRequest(1, prompt), 0)
    p.build(SchedulerOutput(new_requests=[report(1, prompt, list(range(8)), 0, 100)]))
    saves = []
    for i in range(60):
        meta = p.build(SchedulerOutput(cached_requests=[report(1, [5], [], 100 + i, 1)]))
        saves += meta.saves
    assert saves == []


def test_unfull_tail_saved_once_at_prompt_end() -> None:
    p, _ = planner(save_unfull_chunk=True)
    prompt = list(range(100))
    p.match(FakeRequest(1, prompt), 0)
    meta = p.build(SchedulerOutput(new_requests=[report(1, prompt, list(range(8)), 0, 100)]))
    assert [(s.start, s.end) for s in meta.saves] == [(0, 100)]
    meta = p.build(SchedulerOutput(cached_requests=[report(1, [1], [], 100, 1)]))
    assert meta.saves == []


def test_unfull_tail_saved_once_without_decode_saves() -> None:
    """With decode saves off the save limit stays at the prompt's end: its partial last chunk is
    still saved once, not at every decode step."""
    p, _ = planner(save_unfull_chunk=True, save_decode_cache=False)
    prompt = list(range(100))
    p.match(FakeRequest(1, prompt), 0)
    meta = p.build(SchedulerOutput(new_requests=[report(1, prompt, list(range(8)), 0, 100)]))
    assert [(s.start, s.end) for s in meta.saves] == [(0, 100)]
    again = []
    for i in range(5):
        meta = p.build(SchedulerOutput(cached_requests=[report(1, [7], [], 100 + i, 1)]))
        again += meta.saves
    assert again == []


def test_request_without_lookup_is_planned_from_its_report() -> None:
    p, _ = planner()
    data = report(9, list(range(64)), [0, 1, 2, 3], 0, 64)
    data.cache_salt = "tenant"
    meta = p.build(SchedulerOutput(new_requests=[data]))
    assert [(s.start, s.end, s.prompt.salt) for s in meta.saves] == [(0, 64, "tenant")]


def test_finished_without_saves_is_synchronous_and_releases_unplanned_pins() -> None:
    p, index = planner(hit=128)
    req = FakeRequest(4, list(range(200)))
    p.match(req, 0)
    assert p.finished(req) is False
    assert PinKey("req", 4) in index.released


def test_metadata_pickles() -> None:
    p, _ = planner(hit=64)
    req = FakeRequest(1, list(range(100)), cache_salt="s")
    p.match(req, 0)
    p.after_alloc(req, [list(range(7))])
    meta = p.build(SchedulerOutput(new_requests=[report(1, req.tokens, list(range(7)), 0, 36)]))
    again = pickle.loads(pickle.dumps(meta))
    assert isinstance(again, ConnectorMetadata) and again == meta and again.loads


def test_a_transfer_names_its_prompt_per_target_by_hashes_or_tokens() -> None:
    tokens, blocks = list(range(128)), [-1, -1, 5, 6, 7, 8, 9, 10]
    hashed = Prompt(tokens, "s", {TargetId(0, 0): b"h00", TargetId(0, 1): b"h01"})
    transfer = Transfer(3, hashed, 0, blocks, 32, 128)
    assert transfer.for_target(TargetId(0, 1)) == BlockTransfer(b"h01", "s", blocks, 32, 128)
    assert transfer.for_target(TargetId(1, 0)) == BlockTransfer(tokens, "s", blocks, 32, 128)  # not hashed
    plain = Transfer(3, Prompt(tokens, None), 0, blocks, 32, 128)
    assert plain.for_target(TargetId(0, 0)) == BlockTransfer(tokens, None, blocks, 32, 128)


def test_salt_read_from_request_and_request_data() -> None:
    assert request_salt(FakeRequest(1, [], cache_salt="a")) == "a"
    data = report(1, [], [], 0, 0)
    data.cache_salt_id = 42
    assert request_salt(data) == 42
    p, index = planner()
    p.match(FakeRequest(1, list(range(80)), cache_salt="x"), 0)
    assert index.lookups[-1][1] == "x"


@pytest.mark.parametrize("tpb,chunk", [(32, 48), (64, 256 + 32)])
def test_settings_refuse_chunk_not_multiple_of_block(tpb: int, chunk: int) -> None:
    class Args:
        model = "m"
        tensor_parallel_size = 1

        class kv_cache_config:  # noqa: N801
            tokens_per_block = tpb

    with pytest.raises(ValueError, match="not a multiple"):
        ConnectorSettings.from_llm_args(Args, LMCacheEngineConfig.from_defaults(chunk_size=chunk))


def test_settings_refuse_pipeline_parallel() -> None:
    class Args:
        model = "m"
        pipeline_parallel_size = 2

    with pytest.raises(ValueError, match="pipeline parallelism"):
        ConnectorSettings.from_llm_args(Args, LMCacheEngineConfig.from_defaults())


@pytest.mark.parametrize("v2", [False, True])
def test_settings_refuse_a_v1_host_block_pool(v2: bool) -> None:
    """V1's host (secondary) pool moves blocks between pool rows: block ids no longer name rows."""

    class Args:
        model = "m"

        class kv_cache_config:  # noqa: N801
            tokens_per_block = TPB
            host_cache_size = 8 << 30
            use_kv_cache_manager_v2 = v2

    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK)
    if v2:
        assert ConnectorSettings.from_llm_args(Args, config).kv_manager_v2
    else:
        with pytest.raises(ValueError, match="host_cache_size=8589934592 .* Set host_cache_size=0"):
            ConnectorSettings.from_llm_args(Args, config)


@pytest.mark.parametrize(
    ("windows", "v2", "expected"),
    [
        (None, False, None),
        ([4096], False, 4096),
        ([4096] * 3, False, 4096),
        ([32768], False, None),  # not below max_seq_len: full attention
        ([4096], True, None),  # V2 describes its groups' windows itself
        ([4096, 32768], False, ValueError),
        ([1024, 4096], False, ValueError),
    ],
)
def test_a_v1_pools_attention_window_is_read_and_several_are_refused(windows, v2, expected) -> None:
    """Under a sliding window V1 hands the blocks the window passed to other requests, and the KV of
    the tokens after it differs from full attention's: the pool's target must carry its window."""

    class Args:
        model = "m"
        max_seq_len = 32768

        class kv_cache_config:  # noqa: N801
            tokens_per_block = TPB
            max_attention_window = windows
            use_kv_cache_manager_v2 = v2

    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK)
    if expected is ValueError:
        with pytest.raises(ValueError, match="several attention windows.*use_kv_cache_manager_v2=True"):
            ConnectorSettings.from_llm_args(Args, config)
        return
    settings = ConnectorSettings.from_llm_args(Args, config)
    assert settings.window == expected
    (target,) = targets_of_pool(torch.zeros(4, 2, 2, 8), settings.window)
    assert target.window == expected
    assert target.key_suffix == ("" if expected is None else f"#w{expected}")


def test_a_miss_is_not_released() -> None:
    p, index = planner(hit=0)
    assert p.match(FakeRequest(1, list(range(300))), 0) == (0, False)
    assert index.lookups == [(300, None, PinKey("req", 1))] and index.released == []  # one call for a miss


def test_without_the_scheduled_count_a_chunked_prefill_saves_what_earlier_steps_computed() -> None:
    """TRT-LLM before 1.2.0rc2 reports no ``num_scheduled_tokens``: with chunked prefill a first step
    may compute 64 tokens of 256, so nothing may be saved before the next report says what was
    computed; without it a context step computes the whole prompt, saved at once (a request that
    ends on its prefill step has no later report)."""
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK)
    prompt = list(range(4 * CHUNK))
    chunked = Planner(ConnectorSettings("m", 1, TPB, CHUNK, chunked_prefill=True), config, FakeIndex(0), "t")
    meta = chunked.build(SchedulerOutput(new_requests=[report(1, prompt, list(range(16)), 0, None)]))
    assert meta.saves == []
    meta = chunked.build(SchedulerOutput(cached_requests=[report(1, [], [], 2 * CHUNK, None)]))
    assert [(s.start, s.end) for s in meta.saves] == [(0, 2 * CHUNK)]
    whole, _ = planner()
    meta = whole.build(SchedulerOutput(new_requests=[report(1, prompt, list(range(16)), 0, None)]))
    assert [(s.start, s.end) for s in meta.saves] == [(0, 4 * CHUNK)]
