"""Tests for LMCacheEngineConfig / load_engine_config and lmcache.logging."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lmcache.logging as lmlog
from lmcache.config import (
    UNSUPPORTED_UPSTREAM_KEYS,
    GiB,
    LMCacheEngineConfig,
    check_host_resources,
    load_engine_config,
)
from lmcache.logging import parse_level
from lmcache.v1.config import LMCacheEngineConfig as V1Config
from lmcache.v1.config import load_engine_config as v1_load

C = LMCacheEngineConfig


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host env may carry LMCACHE_* variables; tests start from none."""
    for name in list(os.environ):
        if name.startswith("LMCACHE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def restore_log_level():
    root = logging.getLogger("lmcache")
    level = root.level
    yield
    root.setLevel(level)


def test_pool_sharing_is_validated_and_read_from_the_environment():
    assert C.from_env({"LMCACHE_POOL_SHARING": "Shared-L1"}).pool_sharing == "shared-l1"
    assert C.from_defaults(pool_sharing="export").pool_sharing == "export"
    with pytest.raises(
        ValueError, match="LMCACHE_POOL_SHARING / pool_sharing: 'ipc' is not allowed.*auto, export"
    ):
        C.from_env({"LMCACHE_POOL_SHARING": "ipc"})


def _write(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


# ---- defaults and the seed ---------------------------------------------------------------------


def test_defaults():
    c = C()
    assert c == C.from_defaults() == C.from_dict({}) == C.from_env({})
    assert c.to_dict() == {
        "chunk_size": 256,
        "local_cpu": True,
        "max_local_cpu_size": 5.0,
        "local_disk": None,
        "max_local_disk_size": 0.0,
        "remote_url": None,
        "remote_serde": "naive",
        "save_unfull_chunk": False,
        "save_decode_cache": True,
        "pre_caching_hash_algorithm": "blake3",
        "cache_policy": "LRU",
        "enable_async_loading": False,
        "min_retrieve_tokens": 0,
        "blocking_timeout_secs": 10.0,
        "lookup_timeout_ms": 3000.0,
        "extra_config": None,
        "model_name": None,
        "metrics_port": None,
        "metrics_host": "127.0.0.1",
        "tier_staging_size_gb": 1.0,
        "tier_write_queue_bytes": None,
        "tier_read_threads": 4,
        "remote_fetch_batch": 8,
        "remote_write_batch": 8,
        "tier_retry_initial_s": 1.0,
        "tier_retry_max_s": 30.0,
        "disk_fsync": False,
        "disk_verify_on_startup": False,
        "pool_sharing": "auto",
        "use_layerwise": True,
    }
    assert c.max_local_cpu_bytes == 5 * GiB
    assert c.max_local_disk_bytes == 0


def test_seed_env_lines(monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "256")
    monkeypatch.setenv("LMCACHE_LOCAL_CPU", "True")
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "2.0")
    for c in (load_engine_config(), C.from_env(), v1_load()):
        assert (c.chunk_size, c.local_cpu, c.max_local_cpu_size) == (256, True, 2.0)
        assert c.max_local_cpu_bytes == 2 * GiB
    assert V1Config is C


def test_from_env_types_and_ignores_foreign_vars():
    env = {
        "LMCACHE_CHUNK_SIZE": "  512  ",
        "LMCACHE_LOCAL_CPU": "off",
        "LMCACHE_LOCAL_DISK": "file:///tmp/lmc",
        "LMCACHE_MAX_LOCAL_DISK_SIZE": "3",
        "LMCACHE_SAVE_UNFULL_CHUNK": "YES",
        "LMCACHE_CACHE_POLICY": "fifo",
        "LMCACHE_EXTRA_CONFIG": '{"a": 1}',
        "LMCACHE_METRICS_PORT": "9100",
        "LMCACHE_MODEL_NAME": "'my-model'",
        "LMCACHE_SERVER_URL": "tcp://localhost:5555",
        "LMCACHE_LOG_LEVEL": "debug",
        "LMCACHE_SOMETHING_ELSE": "whatever",
        "OTHER": "x",
    }
    c = C.from_env(env)
    assert c.chunk_size == 512 and c.local_cpu is False and c.save_unfull_chunk is True
    assert c.local_disk == "/tmp/lmc" and c.max_local_disk_bytes == 3 * GiB
    assert c.max_local_cpu_bytes == 0
    assert c.cache_policy == "FIFO" and c.extra_config == {"a": 1}
    assert c.metrics_port == 9100 and c.model_name == "my-model"


# ---- files and load_engine_config ------------------------------------------------------------


def test_file_only(tmp_path, monkeypatch):
    p = _write(tmp_path, "chunk_size: 128\nmax_local_cpu_size: 1.5\ncache_policy: lfu\nremote_url: null\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(p))
    for c in (C.from_file(p), load_engine_config()):
        assert (c.chunk_size, c.max_local_cpu_size, c.cache_policy) == (128, 1.5, "LFU")


def test_env_overrides_file(tmp_path):
    p = _write(tmp_path, "chunk_size: 128\nlocal_disk: /tmp/d\n")
    env = {"LMCACHE_CONFIG_FILE": str(p), "LMCACHE_CHUNK_SIZE": "64", "LMCACHE_MAX_LOCAL_DISK_SIZE": "1"}
    c = load_engine_config(env)
    # env wins, and env can complete the file (disk size) because validation runs on the merge
    assert c.chunk_size == 64 and c.local_disk == "/tmp/d" and c.max_local_disk_size == 1.0


def test_load_without_config_file():
    assert load_engine_config({"LMCACHE_CHUNK_SIZE": "16"}).chunk_size == 16
    assert load_engine_config({}) == C()


def test_effective_config_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="lmcache"):
        load_engine_config({"LMCACHE_CHUNK_SIZE": "64", "LMCACHE_REMOTE_URL": "redis://u:secret@h:6379"})
    recs = [r for r in caplog.records if "effective config" in r.getMessage()]
    assert len(recs) == 1 and recs[0].levelno == logging.INFO
    msg = recs[0].getMessage()
    assert "\n" not in msg and "secret" not in msg
    for key in C().to_dict():
        assert f"{key}=" in msg
    assert "chunk_size=64" in msg


# ---- bad values: each message names key and value ---------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("chunk_size", "abc", "not an integer"),
        ("chunk_size", "256.0", "not an integer"),
        ("chunk_size", 256.0, "not an integer"),
        ("chunk_size", True, "not an integer"),
        ("chunk_size", [1], "not an integer"),
        ("chunk_size", 0, "out of range"),
        ("min_retrieve_tokens", -1, "out of range"),
        ("max_local_cpu_size", "lots", "not a number"),
        ("max_local_cpu_size", -1, "out of range"),
        ("max_local_cpu_size", "nan", "out of range"),
        ("blocking_timeout_secs", 0, "out of range"),
        ("lookup_timeout_ms", "-5", "out of range"),
        ("local_cpu", "maybe", "not a boolean"),
        ("local_cpu", 2, "not a boolean"),
        ("cache_policy", "ARC", "LRU, LFU, FIFO"),
        ("pre_caching_hash_algorithm", "md5", "blake3, sha256, xxh3_128"),
        ("remote_serde", "cachegen", "naive"),
        ("model_name", 123, "not a string"),
        ("remote_url", "http://host:1", "redis://, rediss://, unix://, redis-cluster://, valkey://"),
        ("extra_config", "{bad json", "not valid JSON"),
        ("extra_config", "[1, 2]", "not a mapping"),
        ("extra_config", 5, "not a mapping"),
        ("metrics_port", 70000, "out of range"),
        ("metrics_port", "http", "not an integer"),
        ("max_local_cpu_size", "2GB", "not a number: write the number alone, without a unit"),
        ("max_local_cpu_size", "1e300", "is too large (at most 8589934591)"),
        ("max_local_disk_size", 1e12, "is too large"),
        ("tier_staging_size_gb", "512MiB", "without a unit"),
    ],
)
def test_bad_values(key, value, words):
    with pytest.raises(ValueError) as ei:
        C.from_dict({key: value})
    msg = str(ei.value)
    assert key in msg and f"LMCACHE_{key.upper()}" in msg and words in msg
    shown = value.strip() if isinstance(value, str) else value
    assert repr(shown) in msg


def test_bad_env_value_names_env_var():
    with pytest.raises(ValueError, match=r"LMCACHE_CHUNK_SIZE / chunk_size: 'abc' is not an integer"):
        load_engine_config({"LMCACHE_CHUNK_SIZE": "abc"})


def test_cross_key_rules():
    with pytest.raises(ValueError, match="nothing to cache into"):
        C.from_dict({"local_cpu": False})
    with pytest.raises(ValueError, match="nothing to cache into"):
        C.from_dict({"max_local_cpu_size": 0})
    with pytest.raises(ValueError, match="max_local_disk_size"):
        C.from_dict({"local_disk": "/tmp/x"})
    assert C.from_dict({"local_cpu": False, "remote_url": "valkey://h:1"}).remote_url == "valkey://h:1"
    assert C.from_dict({"local_cpu": False, "local_disk": "/d", "max_local_disk_size": 1}).local_disk == "/d"
    with pytest.raises(ValueError, match="empty path"):
        C.from_dict({"local_disk": "file://", "max_local_disk_size": 1})


def test_unknown_key_suggestion():
    with pytest.raises(ValueError, match=r"unknown config key 'chunk_sise'; did you mean 'chunk_size'\?"):
        C.from_dict({"chunk_sise": 1})
    with pytest.raises(ValueError, match="unknown config key 'zzz'"):
        C.from_defaults(zzz=1)


def test_unknown_key_in_file(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'local_cpu'"):
        C.from_file(_write(tmp_path, "local_cpus: true\n"))


# ---- unsupported upstream keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("enable_blending", True),
        ("blend_recompute_ratio", 0.5),
        ("enable_p2p", "true"),
        ("enable_controller", 1),
        ("enable_pd", "on"),
        ("gds_path", "/mnt/gds"),
        ("nixl_buffer_size", 1024),
        ("enable_nixl", True),
        ("numa_mode", "auto"),
        ("internal_api_server_enabled", True),
        ("save_only_first_rank", True),
        ("lmcache_instance_id", "mine"),
    ],
)
def test_unsupported_upstream_key(key, bad):
    with pytest.raises(ValueError, match=f"{key} is not supported by this implementation.*remove it"):
        C.from_dict({key: bad})
    with pytest.raises(ValueError, match=f"{key} is not supported by this implementation"):
        load_engine_config({f"LMCACHE_{key.upper()}": str(bad)})


def test_unsupported_upstream_key_defaults_are_accepted():
    defaults = {key: d[0] for key, (_, d) in UNSUPPORTED_UPSTREAM_KEYS.items()}
    assert C.from_dict(defaults) == C()
    env = {f"LMCACHE_{k.upper()}": "none" if v is None else str(v) for k, v in defaults.items()}
    env["LMCACHE_ENABLE_BLENDING"] = " 'False' "
    assert load_engine_config(env) == C()


# ---- string handling ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("  512  ", 512), ('"512"', 512), ("' 512 '", 512), ("+7", 7)],
)
def test_int_strings(raw, expected):
    assert C.from_dict({"chunk_size": raw}).chunk_size == expected


@pytest.mark.parametrize("raw", ["true", "TRUE", "1", "yes", "On", " 'true' ", True, 1])
def test_bool_true(raw):
    assert C.from_dict({"save_unfull_chunk": raw}).save_unfull_chunk is True


@pytest.mark.parametrize("raw", ["false", "False", "0", "NO", "off", '"off"', False, 0])
def test_bool_false(raw):
    assert C.from_dict({"save_decode_cache": raw}).save_decode_cache is False


@pytest.mark.parametrize("raw", ["", "none", "NULL", " 'None' ", None])
def test_optional_string_none(raw):
    assert C.from_dict({"remote_url": raw, "model_name": raw}).remote_url is None


def test_file_prefix_and_quotes():
    c = C.from_dict({"local_disk": " 'file:///var/cache/lmc' ", "max_local_disk_size": "1.5"})
    assert c.local_disk == "/var/cache/lmc" and c.max_local_disk_bytes == int(1.5 * GiB)
    assert C.from_dict({"local_disk": "/plain", "max_local_disk_size": 1}).local_disk == "/plain"
    assert C.from_dict({"cache_policy": ' "lfu" '}).cache_policy == "LFU"
    assert C.from_dict({"pre_caching_hash_algorithm": "SHA256"}).pre_caching_hash_algorithm == "sha256"


def test_extra_config_forms():
    assert C.from_dict({"extra_config": {"x": [1]}}).extra_config == {"x": [1]}
    assert C.from_dict({"extra_config": '  {"x": 2}  '}).extra_config == {"x": 2}
    assert C.from_dict({"extra_config": ""}).extra_config is None


def test_direct_construction_validates():
    with pytest.raises(ValueError, match="chunk_size"):
        C(chunk_size=-1)
    assert C(chunk_size="64").chunk_size == 64  # type: ignore[arg-type]


# ---- with_overrides / round trip ------------------------------------------------------------------


def test_with_overrides():
    base = C.from_defaults(chunk_size=64)
    c = base.with_overrides(cache_policy="lfu", max_local_cpu_size="1")
    assert c.chunk_size == 64 and c.cache_policy == "LFU" and c.max_local_cpu_size == 1.0
    assert base.cache_policy == "LRU"  # a copy
    with pytest.raises(ValueError, match="chunk_size"):
        base.with_overrides(chunk_size=0)
    with pytest.raises(ValueError, match="did you mean 'chunk_size'"):
        base.with_overrides(chunk_sizes=1)
    with pytest.raises(ValueError, match="not supported"):
        base.with_overrides(enable_blending=True)


def test_repr_masks_password():
    c = C.from_dict({"remote_url": "rediss://:hunter2@host:6380/0"})
    assert "hunter2" not in repr(c) and "rediss://:***@host:6380/0" in repr(c)


_optional_text = st.none() | st.text(
    alphabet=st.characters(min_codepoint=97, max_codepoint=122), min_size=2, max_size=12
).filter(lambda s: s not in ("none", "null"))
_valid = st.fixed_dictionaries(
    {
        "chunk_size": st.integers(1, 1 << 20),
        "local_cpu": st.booleans(),
        "max_local_cpu_size": st.floats(0.001, 1e4),
        "local_disk": st.none() | st.just("/tmp/lmc-disk"),
        "max_local_disk_size": st.floats(0.001, 1e4),
        "remote_url": st.none() | st.sampled_from(["redis://h:6379", "unix:///tmp/r.sock", "valkey://v:1"]),
        "remote_serde": st.just("naive"),
        "save_unfull_chunk": st.booleans(),
        "save_decode_cache": st.booleans(),
        "pre_caching_hash_algorithm": st.sampled_from(["blake3", "sha256", "xxh3_128"]),
        "cache_policy": st.sampled_from(["LRU", "LFU", "FIFO"]),
        "enable_async_loading": st.booleans(),
        "min_retrieve_tokens": st.integers(0, 10_000),
        "blocking_timeout_secs": st.floats(0.001, 1e5),
        "lookup_timeout_ms": st.floats(0.001, 1e7),
        "extra_config": st.none() | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
        "model_name": _optional_text,
        "metrics_port": st.none() | st.integers(0, 65535),
    }
).filter(lambda d: d["local_cpu"] or d["local_disk"] or d["remote_url"])


@settings(deadline=None)  # a slow example on a busy machine is not a failure
@given(_valid)
def test_round_trip(d):
    c = C.from_dict(d)
    again = C.from_dict(c.to_dict())
    assert again == c and again.to_dict() == c.to_dict()
    as_strings = {k: str(v) for k, v in d.items() if isinstance(v, (int, float))}
    assert C.from_dict(d | as_strings) == c  # env-style strings give the same config


# ---- logging ------------------------------------------------------------------------------------


def test_log_level_debug(monkeypatch, restore_log_level):
    log = lmlog.init_logger("lmcache.test_config")
    monkeypatch.setenv("LMCACHE_LOG_LEVEL", "debug")
    assert lmlog.configure_from_env() == logging.DEBUG
    assert log.isEnabledFor(logging.DEBUG)
    monkeypatch.setenv("LMCACHE_LOG_LEVEL", "WARNING")
    lmlog.configure_from_env()
    assert not log.isEnabledFor(logging.INFO)


def test_log_level_default_info(monkeypatch, restore_log_level):
    monkeypatch.delenv("LMCACHE_LOG_LEVEL", raising=False)
    assert lmlog.configure_from_env() == logging.INFO
    log = lmlog.init_logger("foreign")
    assert log.name == "lmcache.foreign"
    assert log.isEnabledFor(logging.INFO) and not log.isEnabledFor(logging.DEBUG)


def test_log_level_invalid_warns_once(caplog, restore_log_level):
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        env = {"LMCACHE_LOG_LEVEL": "loud-test-value"}
        assert lmlog.configure_from_env(env) == logging.INFO
        assert lmlog.configure_from_env(env) == logging.INFO
    warns = [r for r in caplog.records if "loud-test-value" in r.getMessage()]
    assert len(warns) == 1 and warns[0].levelno == logging.WARNING


def test_single_handler(restore_log_level):
    for _ in range(3):
        lmlog.init_logger("lmcache.a")
        lmlog.configure_from_env({})
    root = logging.getLogger("lmcache")
    ours = [h for h in root.handlers if lmlog.is_lmcache_handler(h)]
    record = logging.LogRecord("lmcache.a", logging.INFO, "f.py", 1, "m", None, None)
    assert len(ours) == 1 and ours[0].format(record) == logging.Formatter(lmlog.LOG_FORMAT).format(record)
    assert root.propagate


# ---- remote URLs, settings moved out of extra_config, file hygiene, host resources -------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://localhost:notaport", "invalid port 'notaport'"),
        ("redis://localhost:0", "invalid port '0'"),
        ("redis://localhost:70000", "invalid port '70000'"),
        ("redis://", "has no host"),
        ("rediss://:pw@", "has no host"),
        ("redis://h:6379/abc", "invalid database number"),
        ("redis://a:1,b:2", "only redis-cluster://"),
        ("unix://relative.sock", "has no socket path"),
        ("redis-cluster://", "no host:port seed"),
        ("redis-cluster://h1:7000,,h2:7001", "empty seed"),
        ("redis-cluster://h1", "no port in the seed 'h1'"),
        ("redis-cluster://h1:7000,h2:x", "invalid port 'x'"),
        ("redis://h:", "empty port in 'h:'"),
        ("redis://h:1:2", "IPv6 hosts go in brackets"),
        ("redis://[::1", "unclosed '['"),
        ("redis://[::1]x", "'x' after the bracketed host"),
    ],
)
def test_every_remote_url_form_is_checked_at_configuration_time(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match="remote_url") as err:
        C.from_dict({"remote_url": url})
    assert problem in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://u:p@h:6379/2",
        "rediss://:pw@[::1]:6380/0",
        "valkey://v:1",
        "unix:///tmp/r.sock",
        "redis-cluster://h1:7000,h2:7001",
        "redis-cluster://u:p@[::1]:7000",
    ],
)
def test_valid_remote_urls_are_accepted(url: str) -> None:
    assert C.from_dict({"remote_url": url}).remote_url == url


@pytest.mark.parametrize("password", ["hunter2", "hun/ter2", "hun@ter2"])
def test_url_errors_never_show_the_password(password: str) -> None:
    with pytest.raises(ValueError) as err:
        C.from_dict({"remote_url": f"redis://user:{password}@h:99999"})
    assert password not in str(err.value) and "redis://user:***@h:99999" in str(err.value)
    assert "invalid port '99999'" in str(err.value)  # the host part, not a piece of the password
    assert password not in repr(C.from_dict({"remote_url": f"redis://user:{password}@h:6379"}))


def test_extra_config_settings_are_validated_keys(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        c = C.from_dict({"extra_config": {"tier_read_threads": "8", "metrics_host": "0.0.0.0", "mine": 1}})
    assert (c.tier_read_threads, c.metrics_host, c.extra_config) == (8, "0.0.0.0", {"mine": 1})
    deprecated = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(deprecated) == 2 and any("LMCACHE_TIER_READ_THREADS" in m for m in deprecated)
    with pytest.raises(ValueError, match=r"extra_config\.tier_read_threads: 8 conflicts with .*=6"):
        C.from_dict({"tier_read_threads": 6, "extra_config": {"tier_read_threads": 8}})
    assert C.from_dict(c.to_dict()) == c
    assert load_engine_config({"LMCACHE_TIER_STAGING_SIZE_GB": "0.5"}).tier_staging_size_gb == 0.5
    for bad, named in (
        ({"extra_config": {"tier_read_threads": "abc"}}, "extra_config.tier_read_threads"),
        ({"tier_staging_size_gb": -1}, "tier_staging_size_gb"),
        ({"tier_staging_size_gb": "nan"}, "tier_staging_size_gb"),
        ({"tier_write_queue_bytes": 0}, "tier_write_queue_bytes"),
        ({"tier_retry_initial_s": "inf"}, "tier_retry_initial_s"),
        ({"tier_retry_initial_s": 5, "tier_retry_max_s": 1}, "tier_retry_max_s"),
        ({"metrics_host": "a b"}, "metrics_host"),
        ({"disk_fsync": "maybe"}, "disk_fsync"),
    ):
        with pytest.raises(ValueError, match=named.replace(".", r"\.")):
            C.from_dict(bad)


def test_l1_beyond_the_host_memory_is_warned_with_the_figure(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="lmcache")
    total_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    warnings = check_host_resources(C(max_local_cpu_size=total_gib * 4))
    assert len(warnings) == 1 and f"({total_gib:.1f} GiB)" in warnings[0]
    assert "LMCACHE_MAX_LOCAL_CPU_SIZE" in warnings[0]
    assert check_host_resources(C(max_local_cpu_size=total_gib * 4), l1_name="--l1-size-gb")[0].startswith(
        "--l1-size-gb"
    )


def test_disk_cap_beyond_the_free_space_is_warned_with_the_figure(tmp_path) -> None:
    free_gib = shutil.disk_usage(tmp_path).free / GiB
    warnings = check_host_resources(
        C(local_disk=str(tmp_path / "l2"), max_local_disk_size=free_gib * 2 + 1, max_local_cpu_size=0.1)
    )
    assert len(warnings) == 1 and "max_local_disk_size" in warnings[0] and "GiB free" in warnings[0]
    assert check_host_resources(C(local_disk=str(tmp_path), max_local_disk_size=0.001)) == []


def test_log_level_names_are_parsed() -> None:
    assert parse_level("debug") == logging.DEBUG and parse_level(" 'WARNING' ") == logging.WARNING
    assert parse_level("15") == 15 and parse_level("VERBOSE") is None


def test_an_lmcache_variable_nothing_reads_is_warned_about_with_the_closest_name(caplog) -> None:
    env = {"LMCACHE_CHUNKSIZE": "128", "LMCACHE_SERVER_MAX_CONNECTIONS": "9", "LMCACHE_LOG_LEVEL": "info"}
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        assert C.from_env(env).chunk_size == 256  # the typo sets nothing
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "LMCACHE_CHUNKSIZE is not a setting lmcache reads; ignored (did you mean LMCACHE_CHUNK_SIZE?)"
    ]


def test_no_variable_the_package_reads_is_warned_about(caplog) -> None:
    """Every ``LMCACHE_*`` name the package's sources read passes without a warning (a server's variable set
    for the whole node, ``LMCACHE_L1_MEMORY`` say, must not tell TRT-LLM's log it is ignored)."""
    import contextlib
    import re
    from pathlib import Path

    import lmcache

    root = Path(lmcache.__file__).parent
    names = {
        n for p in root.rglob("*.py") for n in re.findall(r'"(LMCACHE_[A-Z0-9_]*[A-Z0-9])"', p.read_text())
    }
    assert {"LMCACHE_L1_MEMORY", "LMCACHE_SERVER_URL", "LMCACHE_LOG_LEVEL"} <= names
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        for name in names - {"LMCACHE_CONFIG_FILE"}:
            with contextlib.suppress(ValueError):  # a setting's value refused: read, not ignored
                C.from_env({name: "1"})
    assert [r.getMessage() for r in caplog.records if "not a setting" in r.getMessage()] == []


def test_an_extra_config_key_nothing_reads_is_warned_once_naming_what_was_meant(caplog) -> None:
    """Kept (extensions may read their own keys), but a typo or a misplaced setting is no longer silent."""
    extra = {"tier_read_thred": 3, "enable_nixl": True, "min_retrieve_tokens": 5, "my_extension_knob": 1}
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        c = C.from_dict({"extra_config": extra})
        C.from_dict({"extra_config": extra}).with_overrides(chunk_size=128)  # no second warning
    assert c.extra_config == extra and c.min_retrieve_tokens == 0
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "extra_config.tier_read_thred is not read by lmcache (did you mean tier_read_threads?)",
        "extra_config.enable_nixl is not read by lmcache (an upstream LMCache setting this implementation "
        "does not support)",
        "extra_config.min_retrieve_tokens is not read by lmcache (min_retrieve_tokens is a setting of its "
        "own: move it out of extra_config, or set LMCACHE_MIN_RETRIEVE_TOKENS)",
        "extra_config.my_extension_knob is not read by lmcache (docs/configuration.md lists the settings)",
    ]
