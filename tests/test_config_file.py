"""Reading the YAML config file (lmcache.config_file): LMCACHE_CONFIG_FILE and LMCacheEngineConfig.from_file;
a file that cannot be used is one line naming how the user gave it, never its text."""

from __future__ import annotations

import os

import pytest

from lmcache.config import LMCacheEngineConfig, load_engine_config

C = LMCacheEngineConfig


def _write(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_empty_file_gives_defaults(tmp_path):
    assert C.from_file(_write(tmp_path, "")) == C()


def test_file_must_be_mapping(tmp_path):
    with pytest.raises(ValueError, match="mapping"):
        C.from_file(_write(tmp_path, "- 1\n- 2\n"))


def test_load_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="LMCACHE_CONFIG_FILE"):
        load_engine_config({"LMCACHE_CONFIG_FILE": str(tmp_path / "nope.yaml")})


def test_file_error_names_the_file(tmp_path):
    p = _write(tmp_path, "chunk_size: abc\n")
    with pytest.raises(ValueError, match=r"cfg\.yaml.*chunk_size.*'abc'"):
        C.from_file(p)


def test_a_file_that_is_not_a_config_is_never_echoed(tmp_path) -> None:
    secret = b"root:$6$s3cretHash$xyz:19000:0:99999:7:::"
    for content in (
        secret + b"\ndaemon:*:19000::::::\n",
        b"a: [1\n" + secret + b": x\n",
        b"\xff\xfe" + secret,
    ):
        path = tmp_path / "not-a-config"
        path.write_bytes(content)
        with pytest.raises(ValueError) as err:
            load_engine_config({"LMCACHE_CONFIG_FILE": str(path)})
        assert "s3cret" not in str(err.value) and "LMCACHE_CONFIG_FILE" in str(err.value)


def _not_a_directory(tmp_path):
    (tmp_path / "file").write_text("chunk_size: 128\n")
    return tmp_path / "file" / "cfg.yaml"


def _unreadable(tmp_path):
    path = _write(tmp_path, "chunk_size: 128\n")
    path.chmod(0)
    return path


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda tmp_path: tmp_path, "is a directory (expected a YAML file of config keys)"),
        (lambda tmp_path: tmp_path / "nope.yaml", "no such file (check the path)"),
        (_not_a_directory, "a part of the path is not a directory"),
        (lambda tmp_path: _write(tmp_path, "- 1\n"), "expected a YAML mapping of config keys"),
        (lambda tmp_path: _write(tmp_path, "just text\n"), "got a string"),
        (lambda tmp_path: _write(tmp_path, "a: [1\n"), "not valid YAML at line 2, column 1"),
        (
            lambda tmp_path: _write(tmp_path, "chunk_size: 64\nx: 1\nchunk_size: 128\n"),
            "'chunk_size' is given twice (lines 1 and 3)",
        ),
        pytest.param(
            _unreadable,
            "permission denied (make the file readable",
            marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file"),
        ),
    ],
)
def test_a_config_file_that_cannot_be_used_is_one_line_naming_the_variable_and_the_path(
    tmp_path, make, problem: str
) -> None:
    path = str(make(tmp_path))
    with pytest.raises((ValueError, OSError)) as err:
        load_engine_config({"LMCACHE_CONFIG_FILE": path})
    assert str(err.value).startswith(f"LMCACHE_CONFIG_FILE={path!r}: ") and problem in str(err.value)
    assert "Errno" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises((ValueError, OSError)) as err:
        C.from_file(path, named=f"--config {path!r}")
    assert str(err.value).startswith(f"--config {path!r}: ") and problem in str(err.value)
