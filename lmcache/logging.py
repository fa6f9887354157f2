"""Loggers for the ``lmcache`` hierarchy.

One stderr handler sits on the ``lmcache`` logger so our lines look the same in every host
process; records still propagate (pytest's caplog and the host's own handlers see them).
The level comes from ``LMCACHE_LOG_LEVEL`` (default INFO).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

__all__ = [
    "LOG_FORMAT",
    "ROOT_LOGGER_NAME",
    "configure_from_env",
    "init_logger",
    "is_lmcache_handler",
    "parse_level",
]

ROOT_LOGGER_NAME = "lmcache"
LOG_FORMAT = "[%(asctime)s] LMCache %(levelname)s: %(message)s (%(filename)s:%(lineno)d)"
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "FATAL": logging.CRITICAL,
}
_HANDLER_MARK = "_lmcache_handler"
_warned_bad_level: str | None = None


def is_lmcache_handler(handler: logging.Handler) -> bool:
    """Whether ``handler`` is the one this module installs on the ``lmcache`` logger."""
    return bool(getattr(handler, _HANDLER_MARK, False))


def _install_handler(root: logging.Logger) -> None:
    """Add our handler once, even if this module is imported or reloaded several times."""
    if any(is_lmcache_handler(h) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)


def parse_level(raw: str) -> int | None:
    """The level a ``LMCACHE_LOG_LEVEL`` value names (a name in any case, or a number), else None."""
    raw = raw.strip().strip("'\"").strip()
    if raw.isdigit():
        return int(raw)
    return _LEVELS.get(raw.upper())


def configure_from_env(env: Mapping[str, str] | None = None) -> int:
    """(Re)read ``LMCACHE_LOG_LEVEL`` and apply it to the ``lmcache`` logger; returns the level.

    An invalid value is reported once (per distinct value) and INFO is used instead, so a typo
    never stops the host from starting.
    """
    global _warned_bad_level
    env = os.environ if env is None else env
    root = logging.getLogger(ROOT_LOGGER_NAME)
    _install_handler(root)
    raw = env.get("LMCACHE_LOG_LEVEL", "").strip().strip("'\"").strip()
    level = _LEVELS.get(raw.upper(), logging.INFO) if raw else logging.INFO
    if raw.isdigit():
        level = int(raw)
    root.setLevel(level)
    if raw and not raw.isdigit() and raw.upper() not in _LEVELS and _warned_bad_level != raw:
        _warned_bad_level = raw
        root.warning(
            "LMCACHE_LOG_LEVEL=%r is not a log level (use DEBUG, INFO, WARNING, ERROR or CRITICAL); "
            "using INFO",
            raw,
        )
    return level


def init_logger(name: str) -> logging.Logger:
    """Return a logger under ``lmcache`` (``__name__`` of our modules already is); sets up the root once."""
    root = logging.getLogger(ROOT_LOGGER_NAME)
    if not any(getattr(h, _HANDLER_MARK, False) for h in root.handlers):
        configure_from_env()
    if name != ROOT_LOGGER_NAME and not name.startswith(ROOT_LOGGER_NAME + "."):
        name = f"{ROOT_LOGGER_NAME}.{name}"
    return logging.getLogger(name)
