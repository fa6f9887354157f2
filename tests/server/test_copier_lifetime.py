"""A shared-L1 registration's copier is closed (its CUDA streams handed back for reuse, see
:func:`lmcache.cudart.new_stream`) when the registration goes: unregistered, or registered again in
another mode. The server runs in a thread of this process."""

from __future__ import annotations

from in_process_server import client_of
from support.server_process import MODEL, TPB, shared_pool

from lmcache.server.shared_l1_worker import SharedL1Copier


def test_unregistering_closes_the_copier_once(serve, monkeypatch) -> None:
    closed: list[SharedL1Copier] = []
    real_close = SharedL1Copier.close

    def counting(self: SharedL1Copier) -> None:
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(SharedL1Copier, "close", counting)
    server = serve("shared-l1")
    with client_of(server) as client:
        first = client.register(shared_pool(seed=1), 0, 1, MODEL, TPB, pool_sharing="shared-l1")
        second = client.register(shared_pool(seed=2), 0, 1, MODEL, TPB, pool_sharing="shared-l1")
        copier = client.registrations.copier(first.instance_id)
        assert client.registrations.copier(second.instance_id) is not copier
        assert client.unregister(first.instance_id)
        assert closed == [copier]  # the other registration's copier is still in use
