"""Multi-process mode: the cache server, its wire protocol, its client and pool sharing.

* :mod:`lmcache.server.cli` - ``python -m lmcache.v1.multiprocess.server`` (also ``python -m lmcache.server``)
* :mod:`lmcache.server.server` - :class:`CacheServer`, one CacheEngine behind the stream sockets of the
  seed's URLs, assembled
  from :mod:`~lmcache.server.service` (instances, pins, handlers, reaping, stats; no sockets) with its
  handler groups (:mod:`~lmcache.server.export_transfers`, the server's own copies for a pool it
  opened; :mod:`~lmcache.server.shared_l1_handlers`, the worker's copies into shared L1;
  :mod:`~lmcache.server.claim_handlers`), each taking a :class:`~lmcache.server.calls.Call`,
  :mod:`~lmcache.server.dispatch` (admission, per-connection order, inline policy, workers) and
  :mod:`~lmcache.server.transport` / :mod:`~lmcache.server.listeners` (sockets, the I/O loop)
* :mod:`lmcache.server.client` - :class:`CacheServerClient` (ops, registrations, credentials,
  fail-fast) over :mod:`~lmcache.server.client_lanes` (a small pool of connections per client)
* :mod:`lmcache.server.framing` - frames, shared by both sides
* :mod:`lmcache.server.protocol` - versioned msgspec messages
* :mod:`lmcache.server.pool_sharing` - CPU shared memory and :class:`RawCudaIPCWrapper`
* :mod:`lmcache.server.security` - peer credentials and the server secret (``docs/security.md``)

Imports are lazy so ``import lmcache.server`` stays cheap.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "CacheServer": "lmcache.server.server",
    "ServerConfig": "lmcache.server.server",
    "CacheServerClient": "lmcache.server.client",
    "ServerUnavailable": "lmcache.server.client",
    "ServerError": "lmcache.server.client",
    "DEFAULT_SERVER_URL": "lmcache.server.client",
    "RawCudaIPCWrapper": "lmcache.server.pool_sharing",
    "PoolSharingError": "lmcache.server.pool_sharing",
    "PROTOCOL_VERSION": "lmcache.server.protocol",
    "main": "lmcache.server.cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lmcache.server' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
