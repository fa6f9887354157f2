import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import lmcache
from lmcache.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_help_and_unknown_command(capsys) -> None:
    assert main(["--help"]) == 0
    assert "lmcache server" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["stats", "--count", "-1"])
    assert exit_info.value.code == 2
    assert "--count" in capsys.readouterr().err


def test_stats_of_nothing_listening_fails_at_once_naming_the_default_url(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("LMCACHE_SERVER_URL", f"ipc://{tmp_path}/none.sock")
    assert main(["stats"]) == 1
    err = capsys.readouterr().err
    assert f"ipc://{tmp_path}/none.sock" in err and "is it running" in err


def test_stats_of_an_http_server_says_it_is_no_cache_server(capsys) -> None:
    """A web server's port given by mistake: its reply reads as a frame of over 1 GB, which the error
    names (not just "connection lost"), exit 1, no traceback."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_like_http() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)  # the stats request
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    server = threading.Thread(target=answer_like_http, daemon=True)
    server.start()
    with listener:
        assert main(["stats", f"127.0.0.1:{listener.getsockname()[1]}"]) == 1
        server.join(10)
    err = capsys.readouterr().err
    assert "announced: not a cache server" in err and "Traceback" not in err


def test_version_has_one_source(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lmcache-trtllm {lmcache.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", lmcache.__version__)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "lmcache.__version__" }' in pyproject
    server = subprocess.run(
        [sys.executable, "-m", "lmcache.v1.multiprocess.server", "--version"], capture_output=True, text=True
    )
    assert server.stdout.strip() == f"lmcache-trtllm {lmcache.__version__}"


def test_license_is_the_apache_2_text() -> None:
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()


def test_server_help_lists_the_seed_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lmcache.cli", "server", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--host", "--port", "--l1-size-gb", "--eviction-policy", "--max-workers", "--chunk-size"):
        assert flag in out


def test_demo_runs_and_checks_bytes(capsys) -> None:
    assert main(["demo", "--tokens", "1024", "--device", "cpu", "--runs", "3"]) == 0
    out = capsys.readouterr().out
    assert "bytes identical: True" in out and "1024 of 1024 tokens hit" in out
    assert "median of 3 runs after a warm-up" in out
