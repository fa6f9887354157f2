"""The cache server's pool-sharing modes, named in one place for the GPU tests and benchmarks.

How a worker's KV pool reaches the server's L1:

- ``export``: the server maps the pool itself (CUDA IPC of a ``cudaMalloc`` pool, shared memory
  of a CPU pool) and copies between it and its own L1;
- ``shared-l1``: the server's L1 lives in shared memory that the worker maps; the worker copies
  between its pool and the slots the server names (works for pools that cannot be exported, such
  as KVCacheManagerV2's ``cuMemCreate`` memory);
- ``auto``: ``export`` where the pool can be exported, else ``shared-l1``.

The client asks for a mode with ``CacheServerClient.register(..., pool_sharing=MODE)`` (the MP
adapter reads :data:`ENV`), the server with :data:`SERVER_FLAG`, and
``RegisterInfo.sharing`` says what was chosen (:func:`expected_sharing`). Should those spellings
change, this module is the one place to follow them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from lmcache.server import protocol as P
    from lmcache.server.client import CacheServerClient

AUTO = "auto"
EXPORT = "export"
SHARED_L1 = "shared-l1"
MODES = (EXPORT, SHARED_L1)
"""The modes a benchmark compares side by side (``auto`` resolves to one of them)."""

ENV = "LMCACHE_POOL_SHARING"
"""The MP adapter's setting for the mode its workers register with."""
SERVER_FLAG = "--pool-sharing"
CLIENT_KWARG = "pool_sharing"

CUDA_IPC = "cuda-ipc"
CPU_SHM = "cpu-shm"
"""``RegisterInfo.sharing`` values besides :data:`SHARED_L1`."""


def parse_modes(text: str) -> list[str]:
    """A comma-separated list of :data:`MODES`; a clear error names an unknown one."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(
            f"unknown pool-sharing mode(s) {unknown or text!r}: use a list of {', '.join(MODES)}"
        )
    return modes


def expected_sharing(mode: str, is_cuda: bool) -> str:
    """What ``RegisterInfo.sharing`` must say for a pool registered in ``mode`` that can be exported."""
    if mode == SHARED_L1:
        return SHARED_L1
    return CUDA_IPC if is_cuda else CPU_SHM


def sharing_of_pool_kind(kind: str) -> str:
    """The sharing mode of a ``StatsInfo.instances[i].pool_kind`` (a pool descriptor's tag)."""
    return kind.replace("_", "-")


def server_args(mode: str) -> list[str]:
    """The server's command-line arguments selecting ``mode``."""
    return [SERVER_FLAG, mode]


def register(
    client: CacheServerClient,
    pool: torch.Tensor,
    mode: str,
    model_name: str,
    tokens_per_block: int,
    **kwargs: Any,
) -> P.RegisterInfo:
    """Register ``pool`` (rank 0 of 1) asking for ``mode``; ``kwargs`` go to ``register``."""
    return client.register(pool, 0, 1, model_name, tokens_per_block, **{CLIENT_KWARG: mode}, **kwargs)
