"""The replay README's python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[3] / "lmcache" / "testing" / "trtllm_replay" / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(lmcache_env: pytest.MonkeyPatch, index: int) -> None:
    """Each block in its own namespace; ``lmcache_env`` gives a fresh in-process LMCache engine and
    restores the environment a block may change."""
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": f"readme_{index}"})
