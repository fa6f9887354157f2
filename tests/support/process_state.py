"""This process's descriptors, and a pid no process has: for tests of leaks and of stale leftovers."""

from __future__ import annotations

import os
import subprocess
import sys


def open_descriptors() -> int:
    """How many descriptors this process holds open now."""
    return len(os.listdir("/proc/self/fd"))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid
