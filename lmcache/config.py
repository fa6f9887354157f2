"""LMCacheEngineConfig: YAML file (``LMCACHE_CONFIG_FILE``) + ``LMCACHE_<KEY>`` env overlay + validation.

Every constructor validates, so a bad value fails at startup with a message naming the key, the
value and what is allowed, instead of deep inside the first store.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lmcache.config_file import read_config_file
from lmcache.logging import init_logger
from lmcache.remote_url import URL_FORMS, mask_password, url_problem

__all__ = [
    "ENV_PREFIX",
    "GiB",
    "HASH_ALGORITHMS",
    "CACHE_POLICIES",
    "EXTRA_CONFIG_SETTINGS",
    "REMOTE_SCHEMES",
    "UNSUPPORTED_UPSTREAM_KEYS",
    "LMCacheEngineConfig",
    "check_host_resources",
    "load_engine_config",
]

logger = init_logger(__name__)

GiB = 1 << 30
ENV_PREFIX = "LMCACHE_"
HASH_ALGORITHMS = ("blake3", "sha256", "xxh3_128")
CACHE_POLICIES = ("LRU", "LFU", "FIFO")
SERDES = ("naive",)
POOL_SHARING = ("auto", "export", "shared-l1")
"""``pool_sharing``: how the MP connector shares a KV pool with the cache server (docs/multi-process.md)."""
REMOTE_SCHEMES = ("redis://", "rediss://", "unix://", "redis-cluster://", "valkey://")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"", "none", "null"}
_WITH_UNIT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?\s*[a-z]+", re.IGNORECASE)
"""A number with a unit after it (``2GB``, ``10s``): keys take the bare number, in the unit they name."""
MAX_GIB = float(((1 << 63) - 1) // GiB)
"""The largest size in GiB: its byte count still fits the 64-bit sizes the OS and the tiers use."""


def _label(key: str) -> str:
    if "." in key:  # a setting inside extra_config: it has no variable of its own
        return key
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


def _float(key: str, v: object, lo: float, strict: bool, expected: str, hi: float = math.inf) -> float:
    try:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError
        out = float(_unquote(v) if isinstance(v, str) else v)
    except ValueError:
        with_unit = isinstance(v, str) and _WITH_UNIT.fullmatch(_unquote(v))
        problem = "is not a number" + (": write the number alone, without a unit" if with_unit else "")
        raise _bad(key, v, problem, expected) from None
    if not math.isfinite(out) or out < lo or (strict and out == lo):
        raise _bad(key, v, "is out of range", expected)
    if out > hi:
        raise _bad(key, v, f"is too large (at most {hi:.0f})", expected)
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
    if s is None:
        return None
    if not s.startswith(REMOTE_SCHEMES):
        raise _bad(
            key,
            mask_password(s),
            "has an unsupported scheme",
            "a URL starting with " + ", ".join(REMOTE_SCHEMES),
        )
    problem = url_problem(s)
    if problem is not None:
        raise _bad(key, mask_password(s), problem, URL_FORMS)
    return s


def _optport(key: str, v: object) -> int | None:
    if v is None or (isinstance(v, str) and _unquote(v).lower() in _NONE):
        return None
    return _int(key, v, 0, 65535, "a TCP port 0-65535 (0 = any free port), or none to disable")


def _optint(key: str, v: object, lo: int, expected: str) -> int | None:
    if v is None or (isinstance(v, str) and _unquote(v).lower() in _NONE):
        return None
    return _int(key, v, lo, None, expected)


def _host(key: str, v: object) -> str:
    s = _optstr(key, v)
    if not s or any(c.isspace() or c in "/@?#" for c in s):
        raise _bad(key, v, "is not a host address", "an IP address or host name, e.g. 127.0.0.1 or 0.0.0.0")
    return s


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


def _gib(key: str, v: object, strict: bool = False) -> float:
    expected = "a size in GiB > 0, e.g. 1.0" if strict else _GIB
    return _float(key, v, 0.0, strict, expected, MAX_GIB)


_CONVERT: dict[str, Callable[[str, object], object]] = {
    "chunk_size": lambda k, v: _int(k, v, 1, None, _POS_INT),
    "local_cpu": _bool,
    "max_local_cpu_size": _gib,
    "local_disk": _disk,
    "max_local_disk_size": _gib,
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
    "metrics_host": lambda k, v: _host(k, v),
    "tier_staging_size_gb": lambda k, v: _gib(k, v, strict=True),
    "tier_write_queue_bytes": lambda k, v: _optint(k, v, 1, "bytes > 0, or none (a quarter of L1)"),
    "tier_read_threads": lambda k, v: _int(k, v, 1, 256, "an integer 1-256, e.g. 4"),
    "remote_fetch_batch": lambda k, v: _int(k, v, 1, 4096, "an integer 1-4096, e.g. 8"),
    "remote_write_batch": lambda k, v: _int(k, v, 1, 4096, "an integer 1-4096, e.g. 8"),
    "tier_retry_initial_s": lambda k, v: _float(k, v, 0.0, True, "a number of seconds > 0, e.g. 1.0"),
    "tier_retry_max_s": lambda k, v: _float(k, v, 0.0, True, "a number of seconds > 0, e.g. 30"),
    "disk_fsync": _bool,
    "disk_verify_on_startup": _bool,
    "pool_sharing": lambda k, v: _choice(k, v, POOL_SHARING, False),
    "use_layerwise": _bool,
}

# Settings that earlier versions read from ``extra_config``: still accepted there (validated, moved
# to their own key, with a deprecation warning naming it), so existing config files keep their meaning.
EXTRA_CONFIG_SETTINGS = (
    "metrics_host",
    "tier_staging_size_gb",
    "tier_write_queue_bytes",
    "tier_read_threads",
    "remote_fetch_batch",
    "remote_write_batch",
    "tier_retry_initial_s",
    "tier_retry_max_s",
    "disk_fsync",
    "disk_verify_on_startup",
)

# Upstream LMCache keys we recognise but do not implement: their default values are accepted
# (configs written for upstream keep working), anything else is refused rather than ignored.
UNSUPPORTED_UPSTREAM_KEYS: dict[str, tuple[Callable[[str, object], object], tuple[object, ...]]] = {
    "enable_blending": (_bool, (False,)),
    "blend_recompute_ratio": (lambda k, v: _float(k, v, 0.0, False, "a ratio"), (0.15,)),
    "enable_p2p": (_bool, (False,)),
    "enable_controller": (_bool, (False,)),
    "enable_pd": (_bool, (False,)),
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


_warned_extra_keys: set[str] = set()
"""``extra_config`` keys already warned about: once per process (each ``with_overrides`` re-checks)."""


def _warn_unread_extra_config(extra: Mapping[Any, Any]) -> None:
    """Warn once about each ``extra_config`` key nothing reads (a typo, or a setting put in the wrong
    place), naming what was probably meant. Kept, not refused: extensions may read their own keys."""
    for raw in extra:
        key = str(raw)
        if key in _warned_extra_keys:
            continue
        _warned_extra_keys.add(key)
        if key in _CONVERT:
            env = ENV_PREFIX + key.upper()
            hint = f"{key} is a setting of its own: move it out of extra_config, or set {env}"
        elif key in UNSUPPORTED_UPSTREAM_KEYS:
            hint = "an upstream LMCache setting this implementation does not support"
        else:
            close = difflib.get_close_matches(key, [*_CONVERT, *UNSUPPORTED_UPSTREAM_KEYS], n=1)
            hint = f"did you mean {close[0]}?" if close else "docs/configuration.md lists the settings"
        logger.warning("extra_config.%s is not read by lmcache (%s)", key, hint)


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
    metrics_host: str = "127.0.0.1"
    tier_staging_size_gb: float = 1.0
    tier_write_queue_bytes: int | None = None
    tier_read_threads: int = 4
    remote_fetch_batch: int = 8
    remote_write_batch: int = 8
    tier_retry_initial_s: float = 1.0
    tier_retry_max_s: float = 30.0
    disk_fsync: bool = False
    disk_verify_on_startup: bool = False
    pool_sharing: str = "auto"
    """MP mode: ``export`` (the server maps the pool), ``shared-l1`` (the worker copies into the server's
    shared-memory L1), ``auto`` (export where the pool can be exported; the server's forced mode)."""
    use_layerwise: bool = True  # loads land layer by layer (lmcache.layered_load); the worker's copies only

    def __post_init__(self) -> None:
        """Convert strings (env/YAML) to typed values, then check cross-key rules."""
        for f in fields(self):
            setattr(self, f.name, _CONVERT[f.name](f.name, getattr(self, f.name)))
        if self.extra_config:
            for key in EXTRA_CONFIG_SETTINGS:
                if key in self.extra_config:
                    self._move_from_extra_config(key)
            self.extra_config = self.extra_config or None
            _warn_unread_extra_config(self.extra_config or {})
        if self.tier_retry_max_s < self.tier_retry_initial_s:
            raise ValueError(
                f"{_label('tier_retry_max_s')}: {self.tier_retry_max_s!r} is below tier_retry_initial_s="
                f"{self.tier_retry_initial_s!r} (expected the longest back-off >= the first one)"
            )
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

    def _move_from_extra_config(self, key: str) -> None:
        """Take ``extra_config[key]`` as the setting ``key`` (deprecated spelling, warned); an error if
        the setting is also given, with another value."""
        assert self.extra_config is not None
        value = _CONVERT[key](f"extra_config.{key}", self.extra_config.pop(key))
        default = _DEFAULTS[key]
        current = getattr(self, key)
        if current != default and current != value:
            raise ValueError(
                f"extra_config.{key}: {value!r} conflicts with {_label(key)}={current!r} "
                f"(expected one of them; remove extra_config.{key})"
            )
        logger.warning(
            "extra_config.%s is deprecated: set %s (env %s%s) instead",
            key,
            key,
            ENV_PREFIX,
            key.upper(),
        )
        setattr(self, key, value)

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
    def from_file(cls, path: str | os.PathLike[str], *, named: str | None = None) -> LMCacheEngineConfig:
        """Load a YAML mapping; an empty file gives the defaults. Errors start with ``named`` (how the
        user gave the path, e.g. ``--config '/x.yaml'``; default: the path)."""
        named = named or os.fspath(path)
        data = read_config_file(path, named)
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{named}: {e}") from None

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
                value = mask_password(value)
            parts.append(f"{key}={value!r}")
        return " ".join(parts)


SERVER_ENV = "LMCACHE_SERVER_"
"""The prefix of the cache server's flags' variables (read by its command line)."""
OTHER_ENV_NAMES = frozenset(
    {
        "LMCACHE_CONFIG_FILE",
        "LMCACHE_LOG_LEVEL",
        "LMCACHE_SERVER_URL",
        "LMCACHE_CUDA_IPC_BACKEND",
        "LMCACHE_L1_MEMORY",  # the server's --l1-memory, often set for the whole node
    }
)
"""``LMCACHE_*`` variables read elsewhere than the engine config, besides the ``SERVER_ENV`` ones."""


def _env_overrides(env: Mapping[str, str]) -> dict[str, str]:
    """``LMCACHE_<KEY>`` values for our keys and known upstream keys. Any other ``LMCACHE_*`` name that
    nothing reads (a typo, say) is warned about, with the closest name that is read."""
    out = {}
    known = {ENV_PREFIX + key.upper(): key for key in (*_CONVERT, *UNSUPPORTED_UPSTREAM_KEYS)}
    for name, value in env.items():
        if name in known:
            out[known[name]] = value
        elif name.startswith(ENV_PREFIX) and not (name in OTHER_ENV_NAMES or name.startswith(SERVER_ENV)):
            close = difflib.get_close_matches(name, [*known, *OTHER_ENV_NAMES], n=1)
            logger.warning(
                "%s is not a setting lmcache reads; ignored%s",
                name,
                f" (did you mean {close[0]}?)" if close else " (docs/configuration.md lists them)",
            )
    return out


def load_engine_config(env: Mapping[str, str] | None = None, *, log: bool = True) -> LMCacheEngineConfig:
    """The startup path: ``LMCACHE_CONFIG_FILE`` (if set), then ``LMCACHE_<KEY>`` env vars on top.

    Env wins over the file. The merged values are validated together (so env can fix a file's
    incomplete setting) and, with ``log``, the effective config is logged once at INFO (the server
    logs it itself after applying its flags).
    """
    env = os.environ if env is None else env
    path = _unquote(env.get("LMCACHE_CONFIG_FILE", ""))
    raw: dict[str, Any] = {}
    if path:
        raw = read_config_file(path, f"LMCACHE_CONFIG_FILE={path!r}")
    overrides = _env_overrides(env)
    cfg = LMCacheEngineConfig.from_dict({**raw, **overrides})
    if log:
        source = f"file={path!r}" if path else "no config file"
        env_keys = ",".join(overrides) or "none"
        logger.info("effective config (%s; env overrides: %s): %s", source, env_keys, cfg.describe())
        check_host_resources(cfg)
    return cfg


def _physical_memory_bytes() -> tuple[int, int | None]:
    """(total, available) host memory in bytes; available is None where the OS does not say."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return total, int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, None


def _free_disk_bytes(path: str) -> int | None:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _used_disk_bytes(path: str) -> int:
    """Bytes already in the files under ``path`` (a disk tier's own chunks count as room it has)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def check_host_resources(
    config: LMCacheEngineConfig, *, l1_name: str | None = None, disk_name: str | None = None
) -> list[str]:
    """Compare the L1 and disk sizes with this host; returns the warnings, also logged.

    Warned, not refused: L1 and the disk tier fill lazily, and the seed's ``--l1-size-gb 10`` must
    start on a small test machine too. ``l1_name`` / ``disk_name`` are what the user typed (a flag)
    for the messages; the default is the config key and its variable.
    """
    warnings: list[str] = []
    l1_label = l1_name or _label("max_local_cpu_size")
    if config.max_local_cpu_bytes:
        total, available = _physical_memory_bytes()
        if config.max_local_cpu_bytes > total:
            warnings.append(
                f"{l1_label}: {config.max_local_cpu_size:g} GiB is more than this host's memory "
                f"({total / GiB:.1f} GiB); L1 can never fill, and the host will run out of memory first"
            )
        elif available is not None and config.max_local_cpu_bytes > available:
            warnings.append(
                f"{l1_label}: {config.max_local_cpu_size:g} GiB is more than the memory available now "
                f"({available / GiB:.1f} GiB of {total / GiB:.1f} GiB); L1 is reserved lazily, so the host "
                "may run out of memory once the cache fills"
            )
    if config.local_disk is not None:
        free = _free_disk_bytes(config.local_disk)
        # The cache's own files count as room it has; only walked when free space alone is short.
        if free is not None and config.max_local_disk_bytes > free:
            room = free + _used_disk_bytes(config.local_disk)
            if config.max_local_disk_bytes > room:
                disk_label = disk_name or _label("max_local_disk_size")
                warnings.append(
                    f"{disk_label}: {config.max_local_disk_size:g} GiB is more than the disk holding "
                    f"{config.local_disk} has room for ({room / GiB:.1f} GiB free, counting the cache's "
                    "own files); disk writes will fail once it is full"
                )
    for warning in warnings:
        logger.warning("%s", warning)
    return warnings


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(LMCacheEngineConfig)}
