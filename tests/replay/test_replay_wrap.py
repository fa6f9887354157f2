"""``RecordingConnector(wrap=...)``: a real connector (the ``lmcache`` preset) driven by the replay,
every call counted on the way, under V1 and V2."""

from __future__ import annotations

from collections import Counter

import pytest

from lmcache.testing.trtllm_replay import (
    KvCacheConfig,
    KvCacheConnectorConfig,
    ModelConfig,
    RecordingConnector,
    ReplayExecutor,
    TorchLlmArgs,
    factories_from_config,
)

MODEL = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def lmcache_args(v2: bool) -> TorchLlmArgs:
    return TorchLlmArgs(
        kv_cache_config=KvCacheConfig(tokens_per_block=32, use_kv_cache_manager_v2=v2),
        kv_connector_config=KvCacheConnectorConfig(connector="lmcache"),
    )


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_wrapped_lmcache_preset_is_recorded(lmcache_env: pytest.MonkeyPatch, v2: bool) -> None:
    args = lmcache_args(v2)
    p = [(5 + 7 * i) % 256 for i in range(150)]
    first = ReplayExecutor(args, MODEL).generate([p], 3)[0]  # saves into the in-process engine
    rec = RecordingConnector(wrap=factories_from_config(args.kv_connector_config))
    again = ReplayExecutor(args, MODEL, connector=rec.factories()).generate([p], 3)[0]
    assert again.num_connector_matched_tokens == 128 and again.tokens == first.tokens
    counts = Counter(c.method for c in rec.calls)
    alloc = "update_state_after_alloc_by_layer_group" if v2 else "update_state_after_alloc"
    finished = "request_finished_by_layer_group" if v2 else "request_finished"
    register = "register_kv_cache_layout" if v2 else "register_kv_caches"
    assert counts["get_num_new_matched_tokens"] == counts[alloc] == counts[finished] == counts[register] == 1
    assert counts["build_connector_meta"] == counts["get_finished"] == 3
    assert counts["reserve_prefix"] == 0  # the preset has no reservation trio: the legacy path
    assert type(rec.scheduler.inner).__name__ == "LMCacheKvConnectorScheduler"
