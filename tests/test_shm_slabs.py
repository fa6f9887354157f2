import errno
import gc
import os
import stat

import pytest
import torch
from support.process_state import dead_pid, open_descriptors

from lmcache.memory import HostArena
from lmcache.shm_slabs import SHM_DIR, ShmSlabError, ShmSlabInfo, ShmSlabSource, cleanup_stale, map_slab


def test_slabs_are_private_shm_regions_a_second_mapping_sees() -> None:
    source = ShmSlabSource(shm_dir=SHM_DIR)
    try:
        arena = HostArena(8 << 20, slab_bytes=4 << 20, source=source)
        buf = arena.pool(1 << 20).allocate()
        assert buf is not None and buf.ref.nbytes == 1 << 20
        assert arena.wait_growth(30)  # the next slab, allocated ahead, is a region too
        paths = source.region_paths()
        assert len(paths) == 2
        info = source.describe(buf.ref.slab)
        assert info is not None
        path = os.path.join(SHM_DIR, info.name)
        assert path in paths
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid() and info.nbytes == st.st_size
        buf.data.copy_(torch.arange(1 << 20, dtype=torch.int64).to(torch.uint8))
        mapped = map_slab(info, pin=False)
        seen = mapped.tensor[buf.ref.offset : buf.ref.offset + buf.ref.nbytes]
        assert torch.equal(seen, buf.data)
        first = buf.ref.offset // 4096
        rows = mapped.slot_rows(torch.int32, (32, 32), first, 256)  # the slot as 256 rows of 4 KiB
        assert rows.data_ptr() == seen.data_ptr() and torch.equal(rows.flatten().view(torch.uint8), seen)
        assert mapped.slot_rows(torch.int32, (32, 32), first, 256) is rows  # built once per slot
    finally:
        arena.close()
    assert not any(os.path.exists(p) for p in paths) and source.region_paths() == []


def test_a_freed_slab_loses_its_name(tmp_path) -> None:
    source = ShmSlabSource(shm_dir=str(tmp_path))
    slab = source.allocate(1 << 16)
    path = tmp_path / slab.name
    assert path.exists() and source.slab(slab.id) is slab
    del slab
    gc.collect()
    assert not path.exists() and source.live_ids() == set()
    source.close()


def test_mapping_refuses_wrong_mode_size_name_and_owner(tmp_path, monkeypatch) -> None:
    source = ShmSlabSource(shm_dir=str(tmp_path))
    slab = source.allocate(4096)
    info = ShmSlabInfo(slab.id, slab.name, 4096)
    assert map_slab(info, pin=False, shm_dir=str(tmp_path)).tensor.numel() == 4096
    with pytest.raises(ShmSlabError, match="announced 8192"):
        map_slab(ShmSlabInfo(info.id, info.name, 8192), pin=False, shm_dir=str(tmp_path))
    with pytest.raises(ShmSlabError, match="not the name of an L1 region"):
        map_slab(ShmSlabInfo(info.id, "../etc/passwd", 4096), pin=False, shm_dir=str(tmp_path))
    os.chmod(tmp_path / info.name, 0o644)
    with pytest.raises(ShmSlabError, match="mode 644"):
        map_slab(info, pin=False, shm_dir=str(tmp_path))
    os.chmod(tmp_path / info.name, 0o600)
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(ShmSlabError, match="not this process's uid"):
        map_slab(info, pin=False, shm_dir=str(tmp_path))


def test_stale_regions_of_dead_servers_are_removed_at_start(tmp_path) -> None:
    stale = tmp_path / f"lmcache-l1-{dead_pid()}-abcdef-0"
    live = tmp_path / f"lmcache-l1-{os.getpid()}-abcdef-0"
    other = tmp_path / "not-ours"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    source = ShmSlabSource(shm_dir=str(tmp_path))
    assert source.stale_removed == 1
    assert not stale.exists() and live.exists() and other.exists()
    assert cleanup_stale(str(tmp_path)) == 0
    source.close()


def test_a_full_tmpfs_is_a_clear_error_not_a_crash(tmp_path, monkeypatch) -> None:
    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    source = ShmSlabSource(shm_dir=str(tmp_path))
    with pytest.raises(ShmSlabError, match="--shm-size") as raised:
        source.allocate(1 << 20)
    assert "--l1-size-gb" in str(raised.value) and "--l1-memory fd" in str(raised.value)
    assert list(tmp_path.iterdir()) == [] and source.region_paths() == []  # nothing left behind
    source.close()


def test_slabs_and_their_mappings_hold_no_descriptor(tmp_path) -> None:
    """A large L1 is thousands of slabs: neither the server's slabs nor a worker's mappings of them
    may each keep a descriptor open (the process would run out), and the memory stays shared."""
    source = ShmSlabSource(shm_dir=str(tmp_path))
    before = open_descriptors()
    slabs = [source.allocate(1 << 20) for _ in range(8)]
    mapped = [
        map_slab(ShmSlabInfo(slab.id, slab.name, slab.nbytes), pin=False, shm_dir=str(tmp_path))
        for slab in slabs
    ]
    assert open_descriptors() == before
    mapped[3].tensor[:4] = 9  # the worker's write is the server's
    assert slabs[3].tensor[:4].tolist() == [9] * 4
    source.close()
