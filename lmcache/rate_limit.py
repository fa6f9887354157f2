"""Warnings that repeat at most once per interval, so a failing tier cannot flood the log."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """Logs a message per ``topic`` at most once every ``interval_s``; counts what it suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 30.0) -> None:
        self._logger = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, topic: str, msg: str, *args: object) -> bool:
        """Log at WARNING unless ``topic`` was logged within the interval; whether it was logged."""
        return self._log(logging.WARNING, topic, msg, *args)

    def error(self, topic: str, msg: str, *args: object) -> bool:
        """Log at ERROR unless ``topic`` was logged within the interval; whether it was logged."""
        return self._log(logging.ERROR, topic, msg, *args)

    def _log(self, level: int, topic: str, msg: str, *args: object) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(topic)
            if last is not None and now - last < self._interval:
                self._suppressed[topic] = self._suppressed.get(topic, 0) + 1
                return False
            self._last[topic] = now
            suppressed = self._suppressed.pop(topic, 0)
        if suppressed:
            msg += f" ({suppressed} similar messages suppressed)"
        self._logger.log(level, msg, *args)
        return True
