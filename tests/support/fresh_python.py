"""Code that acts on a whole process (its collector, msgspec's type caches) runs in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

from support.server_process import subprocess_env


def run_python(code: str) -> Any:
    """Run ``code`` in a fresh interpreter; it prints one JSON value as its last line, returned here."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])
