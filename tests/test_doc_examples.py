"""Every example in README.md, docs/ and examples/ runs as written, or is marked as needing TRT-LLM.

Fenced blocks of README.md and docs/*.md are extracted. ``bash``/``console`` blocks: ``export
LMCACHE_*`` lines load into the config, server and ``lmcache`` command lines parse and validate
with the real parsers, ``make`` targets exist. ``yaml`` blocks: config keys load into
LMCacheEngineConfig, ``kv_connector_config`` names importable classes, Prometheus configs parse.
``python`` blocks need TRT-LLM: each must carry the marker ``<!-- example: needs TRT-LLM ... -->``
on the line before it, and only marked blocks are skipped. Other languages (json, promql, untagged)
are sample output or diagrams, not examples.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmcache.cli import _stats_parser
from lmcache.config import LMCacheEngineConfig, load_engine_config
from lmcache.server.cli import build_parser, engine_config_from_args

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- example: needs TRT-LLM"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PRESETS = {"lmcache", "lmcache-mp"}


def blocks() -> list[tuple[str, str, str, bool]]:
    out = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        for m in FENCE.finditer(text):
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            line = text[: m.start()].count("\n") + 1
            out.append((f"{path.name}:{line}", m.group(1), m.group(2), before.startswith(MARKER)))
    return out


def commands(lang: str, body: str) -> list[list[str]]:
    lines = body.splitlines()
    if lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [
        shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)
    ]


def check_server_args(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.stats is None:
        engine_config_from_args(args)


def check_command(argv: list[str], env: dict[str, str]) -> None:
    if argv[0] == "export":
        name, _, value = argv[1].partition("=")
        assert name.startswith("LMCACHE_"), argv
        env[name] = value
    elif argv[:3] == ["python", "-m", "lmcache.v1.multiprocess.server"]:
        check_server_args(argv[3:])
    elif argv[:2] == ["lmcache", "server"]:
        check_server_args(argv[2:])
    elif argv[:2] == ["lmcache", "stats"]:
        _stats_parser().parse_args(argv[2:])
    elif argv[0] == "make":
        makefile = (REPO / "Makefile").read_text()
        for target in argv[1:]:
            assert re.search(rf"^{target}:", makefile, re.M), f"make {target}: no such target"
    else:
        raise AssertionError(f"no check for the command {argv!r}; check it here or mark the block")


def check_connector_config(kv: dict[str, Any]) -> None:
    if "connector" in kv:
        assert kv["connector"] in PRESETS, kv
        return
    module = importlib.import_module(kv["connector_module"].split()[0])
    for key in ("connector_scheduler_class", "connector_worker_class"):
        assert hasattr(module, kv[key].split()[0]), kv[key]


def check_yaml(body: str) -> None:
    data = yaml.safe_load(body)
    assert isinstance(data, dict)
    if "kv_connector_config" in data:
        check_connector_config(data["kv_connector_config"])
    elif "scrape_configs" in data:
        assert data["scrape_configs"][0]["static_configs"]
    else:
        LMCacheEngineConfig.from_dict(data)


@pytest.mark.parametrize(
    ("where", "lang", "body", "marked"), blocks(), ids=lambda v: v if isinstance(v, str) and ":" in v else ""
)
def test_doc_example(where: str, lang: str, body: str, marked: bool) -> None:
    if lang == "python":
        assert marked, f"{where}: a python example must be runnable here or carry the {MARKER} marker"
        pytest.skip("needs TRT-LLM (marked)")
    if marked:
        pytest.skip("marked as needing TRT-LLM")
    if lang in ("bash", "console", "sh"):
        env: dict[str, str] = {}
        for argv in commands(lang, body):
            check_command(argv, env)
        if env:
            load_engine_config(env)
    elif lang == "yaml":
        check_yaml(body)


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_files(path: Path) -> None:
    check_yaml(path.read_text())


def test_example_service_and_container_commands_parse() -> None:
    unit = (REPO / "examples" / "lmcache-server.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M)
    assert exec_start is not None
    argv = shlex.split(exec_start.group(1))
    assert argv[0].endswith("/lmcache") and argv[1] == "server"
    args = build_parser().parse_args(argv[2:])
    assert args.config == "/etc/lmcache/server.yaml"
    container = (REPO / "examples" / "Containerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", container, re.M)
    assert cmd is not None
    argv = yaml.safe_load(cmd.group(1))
    check_server_args(argv[2:])


def test_readme_verification_recipe_fits_the_pool() -> None:
    """The recipe's prompts fit TRT-LLM's pool (the replay refuses a request needing more blocks)."""
    text = (REPO / "README.md").read_text()
    max_tokens = int(re.search(r"KvCacheConfig\(max_tokens=(\d+)", text).group(1))
    prompt = int(re.search(r"send a (\d+)-token prompt A", text).group(1))
    tokens_per_block = 32
    needed = -(-(prompt + 8) // tokens_per_block)
    assert needed <= max_tokens // tokens_per_block
    assert 2 * prompt > max_tokens  # B must evict A from the GPU pool
