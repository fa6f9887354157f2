"""The worker's loads of one iteration: a load that fails does not keep the others from running."""

from __future__ import annotations

from typing import Any

import pytest
from test_layerwise import _Backend, _plan, _worker

from lmcache.integration.tensorrt_llm.inflight import Done
from lmcache.integration.tensorrt_llm.plan import ConnectorMetadata, LoadPlan
from lmcache.integration.tensorrt_llm.planner import PromisedLoadError
from lmcache.layered_load import LayerReady


class _FailingFirst(_Backend):
    """Fails the load of request 1; records the requests whose loads ran."""

    def __init__(self) -> None:
        super().__init__(layers=None)
        self.loaded: list[int] = []

    def load(self, plan: LoadPlan, context: Any, stream: Any, layers: LayerReady | None = None) -> Done:
        if plan.request_id == 1:
            raise PromisedLoadError("request 1: a promised chunk is gone")
        self.loaded.append(plan.request_id)
        return super().load(plan, context, stream, layers)


def test_a_failed_load_fails_the_iteration_after_the_other_loads_ran() -> None:
    """Each load releases its pins as it runs: one never run would keep them (in L1, for good)."""
    backend = _FailingFirst()
    worker = _worker(backend, layerwise=False)
    worker.bind_connector_meta(ConnectorMetadata(loads=[_plan(1), _plan(2), _plan(3, is_async=True)]))
    with pytest.raises(PromisedLoadError, match="request 1"):
        worker.start_load_kv(None)
    assert backend.loaded == [2, 3]
    assert worker.get_finished([], [3]) == ([], [3])  # the async load that ran is reported
