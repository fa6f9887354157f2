"""LMCacheEngineConfig: YAML file (``LMCACHE_CONFIG_FILE``) + ``LMCACHE_<KEY>`` env overlay + validation.

Every constructor validates, so a bad value fails at startup with a message naming the key, the
value and what is allowed, instead of deep inside the first store.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import yaml

from lmcache.logging import init_logger

__all__ = [
    "ENV_PREFIX",
    "GiB",
    "HASH_ALGORITHMS",
    "CACHE_POLICIES",
    "REMOTE_SCHEMES",
    "UNSUPPORTED_UPSTREAM_KEYS",
    "LMCacheEngineConfig",
    "load_engine_config",
]

logger = init_logger(__name__)

GiB = 1 << 30
ENV_PREFIX = "LMCACHE_"
HASH_ALGORITHMS = ("blake3", "sha256", "xxh3_128")
CACHE_POLICIES = ("LRU", "LFU", "FIFO")
SERDES = ("naive",)
REMOTE_SCHEMES = ("redis://", "rediss://", "unix://", "redis-cluster://", "valkey://")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"", "none", "null"}


def _label(key: str) -> str:
    return f"{ENV_PREFIX}{key.upper()} / {key}"


def _bad(key: str, value: object, problem: str, expected: str) -> ValueError:
    return ValueError(f"{_label(key)}: {value!r} {problem} (expected {expected})")


def _unquote(s: str) -> str:
    """Strip whitespace and one level of matching quotes (as shells and .env files leave them)."""
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        s = s[1:-1].strip()
    return s


def _int(key: str, v: object, lo: int, hi: int | None, expected: str) -> int:
    if isinstance(v, str) and re.fullmatch(r"[+-]?\d+", _unquote(v)):
        out = int(_unquote(v))
    elif isinstance(v, int) and not isinstance(v, bool):
        out = v
    else:
        raise _bad(key, v, "is not an integer", expected)
    if out < lo or (hi is not None and out > hi):
        raise _bad(key, v, "is out of range", expected)
    return out


def _float(key: str, v: object, lo: float, strict: bool, expected: str) -> float:
    try:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError
        out = float(_unquote(v) if isinstance(v, str) else v)
    except ValueError:
        raise _bad(key, v, "is not a number", expected) from None
    if not math.isfinite(out) or out < lo or (strict and out == lo):
        raise _bad(key, v, "is out of range", expected)
    return out


def _bool(key: str, v: object) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and _unquote(v).lower() in _TRUE | _FALSE:
        return _unquote(v).lower() in _TRUE
    raise _bad(key, v, "is not a boolean", "true/false, 1/0, yes/no or on/off")


def _optstr(key: str, v: object) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise _bad(key, v, "is not a string", "a string, or none")
    s = _unquote(v)
    return None if s.lower() in _NONE else s


def _choice(key: str, v: object, allowed: tuple[str, ...], upper: bool) -> str:
    s = _unquote(v) if isinstance(v, str) else None
    s = s and (s.upper() if upper else s.lower())
    if s not in allowed:
        raise _bad(key, v, "is not allowed", "one of " + ", ".join(allowed))
    return s


def _disk(key: str, v: object) -> str | None:
    s = _optstr(key, v)
    if s is not None and s.startswith("file://"):
        s = s[len("file://") :]
        if not s:
            raise _bad(key, v, "has an empty path", "a directory path, e.g. /var/cache/lmcache")
    return s


def _url(key: str, v: object) -> str | None:
    s = _optstr(key, v)
    if s is not None and not s.startswith(REMOTE_SCHEMES):
        raise _bad(key, v, "has an unsupported scheme", "a URL starting with " + ", ".join(REMOTE_SCHEMES))
    return s


def _optport(key: str, v: object) -> int | None:
    if v is None or (isinstance(v, str) and _unquote(v).lower() in _NONE):
        return None
    return _int(key, v, 0, 65535, "a TCP port 0-65535 (0 = any free port), or none to disable")


def _json_obj(key: str, v: object) -> dict[str, Any] | None:
    out = v
    if isinstance(v, str):
        s = _unquote(v)
        if s.lower() in _NONE:
            return None
        try:
            out = json.loads(s)
        except json.JSONDecodeError as e:
            raise _bad(key, s, f"is not valid JSON ({e.msg})", "a JSON object, e.g. '{\"k\": 1}'") from None
    if out is None:
        return None
    if not isinstance(out, dict):
        raise _bad(key, v, "is not a mapping", "a mapping or a JSON object string")
    return dict(out)


_POS_INT = "a positive integer, e.g. 256"
_GIB = "a size in GiB >= 0, e.g. 2.0"
_CONVERT: dict[str, Callable[[str, object], object]] = {
    "chunk_size": lambda k, v: _int(k, v, 1, None, _POS_INT),
    "local_cpu": _bool,
    "max_local_cpu_size": lambda k, v: _float(k, v, 0.0, False, _GIB),
    "local_disk": _disk,
    "max_local_disk_size": lambda k, v: _float(k, v, 0.0, False, _GIB),
    "remote_url": _url,
    "remote_serde": lambda k, v: _choice(k, v, SERDES, False),
    "save_unfull_chunk": _bool,
    "save_decode_cache": _bool,
    "pre_caching_hash_algorithm": lambda k, v: _choice(k, v, HASH_ALGORITHMS, False),
    "cache_policy": lambda k, v: _choice(k, v, CACHE_POLICIES, True),
    "enable_async_loading": _bool,
    "min_retrieve_tokens": lambda k, v: _int(k, v, 0, None, "an integer >= 0"),
    "blocking_timeout_secs": lambda k, v: _float(k, v, 0.0, True, "a number of seconds > 0, e.g. 10"),
    "lookup_timeout_ms": lambda k, v: _float(k, v, 0.0, True, "a number of milliseconds > 0, e.g. 3000"),
    "extra_config": _json_obj,
    "model_name": _optstr,
    "metrics_port": _optport,
}

# Upstream LMCache keys we recognise but do not implement: their default values are accepted
# (configs written for upstream keep working), anything else is refused rather than ignored.
UNSUPPORTED_UPSTREAM_KEYS: dict[str, tuple[Callable[[str, object], object], tuple[object, ...]]] = {
    "enable_blending": (_bool, (False,)),
    "blend_recompute_ratio": (lambda k, v: _float(k, v, 0.0, False, "a ratio"), (0.15,)),
    "enable_p2p": (_bool, (False,)),
    "enable_controller": (_bool, (False,)),
    "enable_pd": (_bool, (False,)),
    "use_layerwise": (_bool, (False,)),
    "gds_path": (_optstr, (None,)),
    "nixl_buffer_size": (lambda k, v: _int(k, v, 0, None, "an integer"), (0,)),
    "enable_nixl": (_bool, (False,)),
    "numa_mode": (_optstr, (None,)),
    "internal_api_server_enabled": (_bool, (False,)),
    "save_only_first_rank": (_bool, (False,)),
    "lmcache_instance_id": (_optstr, (None, "lmcache_default_instance")),
    "pd_role": (_optstr, (None,)),
    "controller_url": (_optstr, (None,)),
    "weka_path": (_optstr, (None,)),
}


def _is_default_unsupported(key: str, value: object) -> bool:
    conv, defaults = UNSUPPORTED_UPSTREAM_KEYS[key]
    if value is None:
        return True
    try:
        return conv(key, value) in defaults
    except ValueError:
        return False


@dataclass(repr=False)
class LMCacheEngineConfig:
    """Validated engine configuration; sizes are GiB, see ``max_local_cpu_bytes`` for bytes."""

    chunk_size: int = 256
    local_cpu: bool = True
    max_local_cpu_size: float = 5.0
    local_disk: str | None = None
    max_local_disk_size: float = 0.0
    remote_url: str | None = None
    remote_serde: str = "naive"
    save_unfull_chunk: bool = False
    save_decode_cache: bool = True
    pre_caching_hash_algorithm: str = "blake3"
    cache_policy: str = "LRU"
    enable_async_loading: bool = False
    min_retrieve_tokens: int = 0
    blocking_timeout_secs: float = 10.0
    lookup_timeout_ms: float = 3000.0
    extra_config: dict[str, Any] | None = field(default=None)
    model_name: str | None = None
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        """Convert strings (env/YAML) to typed values, then check cross-key rules."""
        for f in fields(self):
            setattr(self, f.name, _CONVERT[f.name](f.name, getattr(self, f.name)))
        if self.local_disk is not None and self.max_local_disk_size <= 0:
            raise ValueError(
                f"{_label('max_local_disk_size')}: {self.max_local_disk_size!r} must be > 0 when "
                f"local_disk is set (local_disk={self.local_disk!r}); give the disk tier a size in GiB"
            )
        cpu_on = self.local_cpu and self.max_local_cpu_size > 0
        if not cpu_on and self.local_disk is None and self.remote_url is None:
            raise ValueError(
                f"{_label('local_cpu')}: local_cpu={self.local_cpu!r}, max_local_cpu_size="
                f"{self.max_local_cpu_size!r} and neither local_disk nor remote_url is set: nothing to "
                "cache into (enable local_cpu with a size > 0, or set local_disk or remote_url)"
            )

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LMCacheEngineConfig:
        """Build from a mapping; unknown keys and non-default unsupported upstream keys are errors."""
        known: dict[str, Any] = {}
        for key, value in d.items():
            if key in _CONVERT:
                known[key] = value
            elif key in UNSUPPORTED_UPSTREAM_KEYS:
                if not _is_default_unsupported(key, value):
                    raise ValueError(
                        f"{_label(key)}: {key} is not supported by this implementation "
                        f"(got {value!r}); remove it from the config file / environment"
                    )
            else:
                close = difflib.get_close_matches(str(key), list(_CONVERT), n=1)
                hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(_CONVERT)
                raise ValueError(f"unknown config key {key!r}; {hint}")
        return cls(**known)

    @classmethod
    def from_defaults(cls, **overrides: Any) -> LMCacheEngineConfig:
        """Defaults with keyword overrides (upstream's spelling)."""
        return cls.from_dict(overrides)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LMCacheEngineConfig:
        """Load a YAML mapping; an empty file gives the defaults."""
        try:
            return cls.from_dict(_read_yaml(path))
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LMCacheEngineConfig:
        """Defaults overlaid by ``LMCACHE_<KEY>`` variables (ignores ``LMCACHE_CONFIG_FILE``)."""
        return cls.from_dict(_env_overrides(os.environ if env is None else env))

    def with_overrides(self, **kw: Any) -> LMCacheEngineConfig:
        """A validated copy with some keys changed."""
        return type(self).from_dict({**self.to_dict(), **kw})

    def to_dict(self) -> dict[str, Any]:
        """All keys, plain Python values (from_dict(to_dict()) round-trips)."""
        return asdict(self)

    # ---- derived values -----------------------------------------------------------------------
    @property
    def max_local_cpu_bytes(self) -> int:
        """L1 capacity in bytes; 0 when local_cpu is off."""
        return int(self.max_local_cpu_size * GiB) if self.local_cpu else 0

    @property
    def max_local_disk_bytes(self) -> int:
        """Disk tier capacity in bytes; 0 when local_disk is unset."""
        return int(self.max_local_disk_size * GiB) if self.local_disk is not None else 0

    def __repr__(self) -> str:
        return f"LMCacheEngineConfig({self.describe()})"

    def describe(self) -> str:
        """One line with every key, secrets in URLs masked (for logs)."""
        parts = []
        for key, value in self.to_dict().items():
            if key == "remote_url" and value:
                value = re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", value)
            parts.append(f"{key}={value!r}")
        return " ".join(parts)


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"expected a YAML mapping of config keys, got {type(data).__name__}")
    return data


def _env_overrides(env: Mapping[str, str]) -> dict[str, str]:
    """``LMCACHE_<KEY>`` values for our keys and known upstream keys; everything else is ignored."""
    out = {}
    for key in (*_CONVERT, *UNSUPPORTED_UPSTREAM_KEYS):
        name = ENV_PREFIX + key.upper()
        if name in env:
            out[key] = env[name]
    return out


def load_engine_config(env: Mapping[str, str] | None = None) -> LMCacheEngineConfig:
    """The startup path: ``LMCACHE_CONFIG_FILE`` (if set), then ``LMCACHE_<KEY>`` env vars on top.

    Env wins over the file. The merged values are validated together (so env can fix a file's
    incomplete setting) and the effective config is logged once at INFO.
    """
    env = os.environ if env is None else env
    path = _unquote(env.get("LMCACHE_CONFIG_FILE", ""))
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = _read_yaml(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"LMCACHE_CONFIG_FILE={path!r}: file not found") from None
        except ValueError as e:
            raise ValueError(f"LMCACHE_CONFIG_FILE={path!r}: {e}") from None
    overrides = _env_overrides(env)
    cfg = LMCacheEngineConfig.from_dict({**raw, **overrides})
    source = f"file={path!r}" if path else "no config file"
    env_keys = ",".join(overrides) or "none"
    logger.info("effective config (%s; env overrides: %s): %s", source, env_keys, cfg.describe())
    return cfg
