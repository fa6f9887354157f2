"""A client's pool descriptors, and what it does when a server no longer knows one of its instances
(restarted, or it reaped the instance): the pool's sharing mode chosen again for that server, a refusal
raised as such, and a warning that says so."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from lmcache.logging import init_logger
from lmcache.server import protocol as P
from lmcache.server.client_errors import BadPool, InvalidRequest, RegistrationRefused
from lmcache.server.client_registrations import Registration
from lmcache.server.cuda_driver import PoolSharingError

if TYPE_CHECKING:
    from lmcache.server.client_shared_l1 import SharedL1Transfers

logger = init_logger(__name__)

__all__ = ["choose_again", "log_registered_again", "pool_descriptor", "refused_as_such"]


def pool_descriptor(pool: Any, policy: str, server_policy: Callable[[], str]) -> P.PoolDescriptor:
    """The descriptor of ``pool`` in the mode ``policy`` picks (in ``auto``, after asking the server's
    with ``server_policy``); a descriptor or wrapper is registered as it is."""
    from lmcache.server.pool_sharing import choose_sharing, describe_pool

    if not hasattr(pool, "is_cuda"):
        return describe_pool(pool)
    server = server_policy() if policy == "auto" else "auto"
    return describe_pool(pool, choose_sharing(pool, policy, server))


@contextlib.contextmanager
def refused_as_such() -> Iterator[None]:
    """A re-registration the restarted server refuses as invalid raises :class:`RegistrationRefused`."""
    try:
        yield
    except InvalidRequest as e:
        raise RegistrationRefused(e.code, e.message, "register") from None


def log_registered_again(url: str, iid: int, reg: Registration) -> None:
    logger.warning(
        "cache server at %s did not know instance %d (it restarted or reaped us); "
        "registered the pool again (sharing %s)%s",
        url,
        iid,
        reg.mode,
        f", not used: {reg.mismatch}" if reg.mismatch is not None else "",
    )


def choose_again(reg: Registration, shared_l1: SharedL1Transfers, server_policy: Callable[[], str]) -> None:
    """Pick the mode of an ``auto`` registration again (before re-registering with a new server);
    ``BadPool`` (no cache for this pool, never a crash of the caller) if the server's mode cannot
    share it."""
    try:
        reg.request.pool = pool_descriptor(reg.keep_alive, reg.policy, server_policy)
    except PoolSharingError as exc:
        raise BadPool(
            P.ErrorCode.BAD_POOL.value,
            f"the restarted cache server takes a pool-sharing mode this pool cannot use ({exc}); start "
            "it with --pool-sharing auto, or set LMCACHE_POOL_SHARING to a mode both accept",
            "register",
        ) from exc
    reg.copier = shared_l1.copier_for(reg, reg.copier)
