"""A worker's slab mappings: mapped before a copy, or ahead in the background."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from lmcache.memory import Slab
from lmcache.server import protocol as P
from lmcache.server import slab_mappings
from lmcache.server.slab_mappings import SlabMappings
from lmcache.shm_slabs import ShmSlabError, ShmSlabSource


class Server:
    """The server's side: slabs created in ``tmp_path`` (kept alive) and described as replies do."""

    def __init__(self, shm_dir: str) -> None:
        self.source = ShmSlabSource(shm_dir=shm_dir)
        self.slabs: list[Slab] = []

    def new_slab(self, nbytes: int = 1 << 20) -> P.SlabInfo:
        slab = self.source.allocate(nbytes)
        self.slabs.append(slab)
        return P.SlabInfo(id=slab.id, name=slab.name, nbytes=slab.nbytes)


@pytest.fixture
def server(tmp_path):
    srv = Server(str(tmp_path))
    yield srv
    srv.source.close()


def _held_mapping(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Every slab mapping waits, once begun (``entered``), until ``go`` is set."""
    entered, go = threading.Event(), threading.Event()
    real = slab_mappings.map_slab

    def held(*args, **kwargs):  # type: ignore[no-untyped-def]
        entered.set()
        assert go.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(slab_mappings, "map_slab", held)
    return entered, go


def test_slabs_mapped_ahead_are_there_when_a_copy_needs_them(server, tmp_path) -> None:
    maps = SlabMappings(pin=False, shm_dir=str(tmp_path))
    a, b = server.new_slab(), server.new_slab()
    maps.map_ahead([a, b])
    maps.apply([a], [])  # waits for the background mapping, or maps it itself
    assert maps.wait_ahead(30) and maps.ids() == [a.id, b.id]
    maps.apply([], [a.id])  # freed by the server
    assert maps.ids() == [b.id]


def test_a_slab_that_fails_its_checks_ahead_fails_only_the_copy_that_needs_it(server, tmp_path) -> None:
    maps = SlabMappings(pin=False, shm_dir=str(tmp_path))
    good = server.new_slab()
    wrong = P.SlabInfo(id=99, name=good.name, nbytes=good.nbytes + 1)  # not the announced size
    maps.map_ahead([wrong, good])
    assert maps.wait_ahead(30) and maps.ids() == [good.id]
    with pytest.raises(ShmSlabError, match="the server announced"):
        maps.apply([wrong], [])


def test_mappings_made_ahead_for_an_old_server_are_dropped(server, tmp_path, monkeypatch) -> None:
    maps = SlabMappings(pin=False, shm_dir=str(tmp_path))
    slab = server.new_slab()
    entered, go = _held_mapping(monkeypatch)
    maps.map_ahead([slab])
    assert entered.wait(30)
    maps.clear()  # a new server: what is being mapped belongs to the old one
    go.set()
    assert maps.wait_ahead(30) and maps.ids() == []


def test_a_copys_mapping_of_a_server_that_was_replaced_meanwhile_is_refused(
    server, tmp_path, monkeypatch
) -> None:
    """A restarted server names its slabs from 0 again: a mapping the old one's reply asked for, kept,
    would have the new server's slab of that id copied into and loaded from the old memory."""
    maps = SlabMappings(pin=False, shm_dir=str(tmp_path))
    maps.on_server("old")
    slab = server.new_slab()
    entered, go = _held_mapping(monkeypatch)
    raised: list[BaseException] = []

    def copy() -> None:
        try:
            maps.apply([slab], [])
        except ShmSlabError as e:
            raised.append(e)

    copier = threading.Thread(target=copy)
    copier.start()
    assert entered.wait(30)
    maps.on_server("new")
    go.set()
    copier.join(30)
    assert maps.ids() == [] and len(raised) == 1 and "changed while" in str(raised[0])
    maps.apply([slab], [])  # the new server's slab of that id is mapped afresh
    assert maps.ids() == [slab.id]


def test_a_slab_freed_while_it_is_mapped_ahead_is_not_kept(server, tmp_path, monkeypatch) -> None:
    maps = SlabMappings(pin=False, shm_dir=str(tmp_path))
    slab = server.new_slab()
    entered, go = _held_mapping(monkeypatch)
    maps.map_ahead([slab])
    assert entered.wait(30)
    maps.apply([], [slab.id])  # the server freed it: its memory must not stay mapped here
    go.set()
    assert maps.wait_ahead(30) and maps.ids() == []


def test_a_copy_maps_its_slab_itself_rather_than_wait_behind_the_queue(server, tmp_path, monkeypatch) -> None:
    """The background thread is busy with the first slab announced; a copy into the last one maps it
    at once instead of waiting for every slab before it."""
    maps = SlabMappings(pin=False, shm_dir=str(tmp_path))
    slabs = [server.new_slab() for _ in range(3)]
    entered, go = threading.Event(), threading.Event()
    real = slab_mappings.map_slab

    def slow_first(info, **kwargs):
        if info.id == slabs[0].id:
            entered.set()
            go.wait(30)
        return real(info, **kwargs)

    monkeypatch.setattr(slab_mappings, "map_slab", slow_first)
    maps.map_ahead(slabs)
    assert entered.wait(30)
    copier = threading.Thread(target=maps.apply, args=([slabs[2]], []))
    copier.start()
    copier.join(timeout=30)
    try:
        assert not copier.is_alive(), "the copy waited for the slabs queued before its own"
        assert slabs[2].id in maps.ids() and slabs[0].id not in maps.ids()
    finally:
        go.set()
    assert maps.wait_ahead(30) and maps.ids() == sorted(s.id for s in slabs)


def test_the_thread_that_page_locks_ahead_relaxes_its_capture_mode(server, tmp_path, monkeypatch) -> None:
    """A CUDA worker page-locks the slabs ahead while TRT-LLM may be capturing its CUDA graphs (global
    mode): its thread must relax its capture mode first, on the device of the thread that asked (see
    :mod:`lmcache.cudart`)."""
    from lmcache import cudart

    relaxed: list[tuple[str, int | None]] = []
    monkeypatch.setattr(
        cudart,
        "relax_capture_mode",
        lambda device=None: relaxed.append((threading.current_thread().name, device)),
    )
    monkeypatch.setattr(cudart, "current_device", lambda: 5)
    pinned: list[bool] = []

    def map_slab(info, *, pin, shm_dir):  # type: ignore[no-untyped-def]
        pinned.append(pin)
        return real_map_slab(info, pin=False, shm_dir=shm_dir)  # no CUDA here: mapped, not page-locked

    real_map_slab = slab_mappings.map_slab
    monkeypatch.setattr(slab_mappings, "map_slab", map_slab)
    maps = SlabMappings(pin=True, shm_dir=str(tmp_path))
    maps.map_ahead([server.new_slab(), server.new_slab()])
    assert maps.wait_ahead(30) and len(maps.ids()) == 2
    assert relaxed and set(relaxed) == {("lmcache-map-ahead", 5)} and pinned == [True, True]


def test_several_threads_map_ahead_at_once(server, tmp_path, monkeypatch) -> None:
    """Filling a slab's page tables is per-thread work: up to MAP_AHEAD_THREADS slabs are mapped at
    once (each of three mappings here waits until all three are under way)."""
    monkeypatch.setattr(slab_mappings, "MAP_AHEAD_THREADS", 3)
    together = threading.Barrier(3, timeout=30)
    real_map_slab = slab_mappings.map_slab

    def map_slab(info, *, pin, shm_dir):  # type: ignore[no-untyped-def]
        together.wait()  # raises BrokenBarrierError (the slab stays unmapped) unless three run at once
        return real_map_slab(info, pin=pin, shm_dir=shm_dir)

    monkeypatch.setattr(slab_mappings, "map_slab", map_slab)
    maps = SlabMappings(pin=False, shm_dir=str(tmp_path))
    slabs = [server.new_slab() for _ in range(3)]
    maps.map_ahead(slabs)
    assert maps.wait_ahead(60) and maps.ids() == sorted(s.id for s in slabs)


def test_mappings_stay_for_the_same_server_and_go_for_another(server, tmp_path) -> None:
    maps = SlabMappings(pin=False, shm_dir=str(tmp_path))
    slab = server.new_slab()
    maps.on_server("first")
    maps.apply([slab], [])
    maps.on_server("first")  # another registration with the same server: nothing changes
    assert maps.ids() == [slab.id]
    maps.on_server("restarted")
    assert maps.ids() == [] and maps.server_id == "restarted"


def test_a_copier_refuses_shared_mappings_that_page_lock_otherwise(tmp_path) -> None:
    import torch

    from lmcache.server.shared_l1_worker import SharedL1Copier

    with pytest.raises(ValueError, match="CPU pool needs slab mappings with pin=False"):
        SharedL1Copier(torch.zeros(4, 8), slabs=SlabMappings(pin=True, shm_dir=str(tmp_path)))


class _RecordingMaker:
    """Stands in for the CUDA driver's maker: records the device and the access of each import."""

    def __init__(self) -> None:
        self.imports: list[tuple[int | None, bool]] = []
        self.device: int | None = None

    def import_shared(self, fd: int, nbytes: int, *, cpu_access: bool = True) -> torch.Tensor:
        self.imports.append((self.device, cpu_access))
        return torch.zeros(nbytes, dtype=torch.uint8)


def test_driver_made_slabs_are_imported_for_the_bound_device_alone(monkeypatch) -> None:
    """A CUDA pool's copier binds its mappings to its device: driver-made slabs are then imported for that
    device alone (no CPU access). Before binding, or once pools on two devices share the mappings, they
    are imported with CPU access too (a copy from another device must not fault), and binding a second
    device drops the mappings made for the first alone."""
    from lmcache import fd_slabs

    maker = _RecordingMaker()

    def maker_for(device: int | None) -> _RecordingMaker:
        maker.device = device
        return maker

    monkeypatch.setattr(fd_slabs.driver_host_memory, "maker", maker_for)
    read, write = os.pipe()
    monkeypatch.setattr(
        slab_mappings, "fetch_descriptors", lambda channel, ids: {i: os.dup(read) for i in ids}
    )
    monkeypatch.setattr(slab_mappings, "_caller_device", lambda: 0)
    try:
        maps = SlabMappings(pin=True)
        slab = P.SlabInfo(id=1, name="", nbytes=1 << 20, kind=fd_slabs.KIND_CUDA, channel="ch")
        maps.apply([slab], [])  # not bound yet: the caller's device, and the CPU
        maps.bind(3)
        maps.apply([P.SlabInfo(id=2, name="", nbytes=1 << 20, kind=fd_slabs.KIND_CUDA, channel="ch")], [])
        assert maps.ids() == [1, 2]
        maps.bind(5)  # a second device: what was mapped for device 3 alone goes
        assert maps.ids() == [] and maps.device is None
        maps.apply([slab], [])  # two devices copy: the caller's device, and the CPU
    finally:
        os.close(read)
        os.close(write)
    assert maker.imports == [(0, True), (3, False), (0, True)]
