"""What the connector needs from a cache back-end on each worker (in-process engine, cache server).

The scheduler side is :class:`lmcache.integration.tensorrt_llm.planner.CacheIndex`; this is the
worker side. Both presets share one connector over these two interfaces.
"""

from __future__ import annotations

from typing import Any, Protocol

from lmcache.integration.tensorrt_llm.inflight import Done
from lmcache.integration.tensorrt_llm.plan import LoadPlan, Transfer
from lmcache.integration.tensorrt_llm.planner import PromisedLoadError
from lmcache.integration.tensorrt_llm.save_fence import SaveFence
from lmcache.integration.tensorrt_llm.targets import PoolTarget
from lmcache.integration.tensorrt_llm.window_fence import SaveCopies
from lmcache.layered_load import LayerReady
from lmcache.logging import init_logger

logger = init_logger("lmcache.integration.tensorrt_llm")


class TransferBackend(Protocol):
    """Moves one rank's KV between its registered pools and the cache."""

    def register(self, targets: list[PoolTarget]) -> None:
        """Take this rank's pools (one per layer-group region); called once at start-up."""
        ...

    def begin_iteration(self, context: Any) -> None:
        """Called once per iteration before its loads, with the plan's ``backend_context``."""
        ...

    def layerwise_layers(self) -> int | None:
        """The layers of this rank's pool if its loads can go layer-wise (one pool with a layer axis,
        copied by this process), else None."""
        ...

    def load(self, plan: LoadPlan, context: Any, stream: Any, layers: LayerReady | None = None) -> Done:
        """Carry out a promised load (``context``: the metadata's ``backend_context``).

        A synchronous load is ordered before the forward on ``stream``, or, given ``layers``, goes
        layer-wise: ``layers`` gets each layer's event and ``stream`` is not ordered (the caller waits
        layer by layer); an async one may run on. The returned check tells when the KV is in place and
        visible; it raises :class:`PromisedLoadError` if the load failed. A failure known at once
        raises here.
        """
        ...

    def save(self, saves: list[Transfer], fence: SaveFence) -> list[SaveCopies]:
        """Save, the copies ordered after ``fence`` (waited for off the executor thread); per save, in
        order, the futures of its copies (see :data:`.window_fence.SaveCopies`): the save's pages are
        free again once they are done."""
        ...


def transfers_by_group(plan: LoadPlan) -> dict[int, list[Transfer]]:
    """The plan's transfers per layer group, in order (a group may have several, see ``LoadPlan``)."""
    by_group: dict[int, list[Transfer]] = {}
    for transfer in plan.transfers:
        by_group.setdefault(transfer.group, []).append(transfer)
    return by_group


def check_loaded(plan: LoadPlan, transfer: Transfer, loaded: int) -> None:
    """Log the seed's "Retrieved" line; fail the request if the cache supplied less than promised."""
    expected = transfer.end - transfer.start
    logger.debug("Retrieved %d out of %d required tokens", loaded, plan.required)
    if loaded < expected:
        raise PromisedLoadError(
            f"LMCache promised tokens [{transfer.start}, {transfer.end}) of request {plan.request_id} "
            f"(layer group {transfer.group}) but could load only {loaded}; refusing to use unloaded KV blocks"
        )
