import subprocess
import sys

from lmcache.cli import main


def test_help_and_unknown_command(capsys) -> None:
    assert main(["--help"]) == 0
    assert "lmcache server" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["stats"]) == 2


def test_server_help_lists_the_seed_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lmcache.cli", "server", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--host", "--port", "--l1-size-gb", "--eviction-policy", "--max-workers", "--chunk-size"):
        assert flag in out


def test_demo_runs_and_checks_bytes(capsys) -> None:
    assert main(["demo", "--tokens", "1024", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bytes identical: True" in out and "1024 of 1024 tokens hit" in out
