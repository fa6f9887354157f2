"""A lower tier's mistake never switches the cache off: misses from that tier, L1 keeps serving."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest
from tier_helpers import make_engine, make_pool, space_of, store_all, tokens

from lmcache.metrics import health_report
from lmcache.storage.disk_store import MARKER, TIER_DIR
from lmcache.storage.remote_store import RemoteStore


def test_unwritable_disk_directory_degrades_health_at_start_and_l1_serves(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, logger="lmcache")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    engine = make_engine(disk=blocker / "l2")  # mkdir under a regular file fails, also as root
    healthy, body = health_report(engine.snapshot())
    assert not healthy and body["tiers"]["disk"] is False and body["tiers"]["l1"] is True
    assert "cannot be written" in caplog.text
    pool = make_pool()
    toks = tokens(128)
    assert store_all(engine, pool, toks) == 128
    assert engine.lookup(space_of(pool), toks) == 128
    engine.tiers.close()


def test_writable_disk_directory_is_healthy_at_start(tmp_path: Path) -> None:
    engine = make_engine(disk=tmp_path / "l2")
    assert health_report(engine.snapshot())[0]
    # The write probe leaves nothing behind: the tier's own directory holds only its marker.
    assert [p.name for p in (tmp_path / "l2").iterdir()] == [TIER_DIR]
    assert [p.name for p in (tmp_path / "l2" / TIER_DIR).iterdir()] == [MARKER]
    engine.tiers.close()


def test_missing_redis_package_is_named_with_the_install_command(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "redis", None)  # what `import redis` sees when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'lmcache-trtllm\[redis\]'"):
        make_engine(remote_url="redis://127.0.0.1:1")


def test_unreachable_remote_is_a_miss_a_warning_and_degraded_health(caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, logger="lmcache")
    engine = make_engine(remote_url="redis://127.0.0.1:1")  # nothing listens on port 1
    pool = make_pool()
    stored, missing = tokens(128), tokens(128, offset=10_000)
    assert store_all(engine, pool, stored) == 128
    assert engine.lookup(space_of(pool), stored) == 128  # L1 still answers
    assert engine.lookup(space_of(pool), missing) == 0  # the remote's failure is a miss
    healthy, body = health_report(engine.snapshot())
    assert not healthy and body["tiers"]["remote"] is False
    # The first failure may be met by the write-behind thread, which warns on its own time.
    message = "remote tier redis://127.0.0.1:1 unavailable"
    deadline = time.monotonic() + 30
    while message not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.lookup(space_of(pool), missing)  # failing again within the interval: not logged again
    engine.tiers.close()
    assert caplog.text.count(message) == 1  # rate-limited


def test_any_exception_of_the_remote_client_is_a_miss(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def broken_client(self: RemoteStore, timeout: float) -> object:
        raise ValueError("a bug in a lower tier")

    monkeypatch.setattr(RemoteStore, "_make_client", broken_client)
    engine = make_engine(remote_url="redis://127.0.0.1:1")
    pool = make_pool()
    assert engine.lookup(space_of(pool), tokens(128, offset=20_000)) == 0
    assert store_all(engine, pool, tokens(128)) == 128
    assert engine.lookup(space_of(pool), tokens(128)) == 128
    engine.tiers.close()
