"""Wire protocol and pool sharing, in one process (no server needed)."""

from __future__ import annotations

import multiprocessing
import os
import tempfile

import msgspec
import pytest
import torch
import torch.multiprocessing as tmp

from lmcache.server import protocol as P
from lmcache.server.pool_sharing import (
    PoolSharingError,
    RawCudaIPCWrapper,
    describe_pool,
    open_pool,
    share_cpu_pool,
)


def test_requests_round_trip_through_msgpack() -> None:
    reqs = [
        P.Ping(rid=1),
        P.Lookup(
            rid=2, instance_id=(1 << 63) - 1, tokens=P.tokens_to_bytes([1, 2, 3]), cache_salt="t", pin_id=9
        ),
        P.Store(rid=3, instance_id=1, tokens=[5, 6], block_ids=b"\0" * 8, start=0, end=2),
        P.Retrieve(rid=4, instance_id=1, tokens=[5], block_ids=[0], end=0, pin_id="r1", pin_owner=7),
        P.Heartbeat(rid=5, instance_ids=[1, 2]),
        P.LookupHashes(rid=6, instance_id=1, chunk_hashes=b"\1" * 64, num_tokens=600, pin_id="p"),
    ]
    for req in reqs:
        assert P.decode_request(P.encode(req)) == req


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"", P.ErrorCode.MALFORMED),
        (b"\xc1garbage", P.ErrorCode.MALFORMED),
        (msgspec.msgpack.encode([1, 2, 3]), P.ErrorCode.MALFORMED),
        (msgspec.msgpack.encode({"v": 99, "rid": 4, "op": "ping"}), P.ErrorCode.VERSION_MISMATCH),
        (
            msgspec.msgpack.encode({"v": P.PROTOCOL_VERSION, "rid": 4, "op": "explode"}),
            P.ErrorCode.UNKNOWN_OP,
        ),
        (
            msgspec.msgpack.encode({"v": P.PROTOCOL_VERSION, "rid": 4, "op": "lookup", "instance_id": "x"}),
            P.ErrorCode.INVALID,
        ),
        (
            msgspec.msgpack.encode({"v": P.PROTOCOL_VERSION, "rid": 4, "op": "ping", "extra": 1}),
            P.ErrorCode.INVALID,
        ),
        (
            msgspec.msgpack.encode(
                {"v": P.PROTOCOL_VERSION, "rid": 4, "op": "lookup", "instance_id": -5, "tokens": []}
            ),
            P.ErrorCode.INVALID,
        ),
        (
            msgspec.msgpack.encode(
                {
                    "v": P.PROTOCOL_VERSION,
                    "rid": 4,
                    "op": "lookup_hashes",
                    "instance_id": 1,
                    "chunk_hashes": "x",
                }
            ),
            P.ErrorCode.INVALID,
        ),
    ],
)
def test_bad_frames_raise_protocol_errors_with_codes(frame: bytes, code: P.ErrorCode) -> None:
    with pytest.raises(P.ProtocolError) as info:
        P.decode_request(frame)
    assert info.value.code == code
    if code is not P.ErrorCode.MALFORMED:
        assert info.value.rid == 4


@pytest.mark.parametrize("field", ["tokens", "block_ids"])
def test_long_id_lists_are_refused_and_the_same_ids_as_bytes_accepted(field: str) -> None:
    """The I/O thread decodes every frame: a list costs it an object per id, so long ones must be bytes."""
    ids = list(range(P.MAX_LIST_IDS + 1))
    fields = {"instance_id": 1, "tokens": b"", "block_ids": b"", "start": 0, "end": 0}
    frame = {"v": P.PROTOCOL_VERSION, "rid": 4, "op": "store", **fields}
    with pytest.raises(P.ProtocolError, match=rf"{P.MAX_LIST_IDS}.*{field}") as info:
        P.decode_request(msgspec.msgpack.encode({**frame, field: ids}))
    assert info.value.code == P.ErrorCode.INVALID and info.value.rid == 4
    req = P.decode_request(msgspec.msgpack.encode({**frame, field: P.tokens_to_bytes(ids)}))
    assert len(getattr(req, field)) == 8 * len(ids)
    assert getattr(P.decode_request(msgspec.msgpack.encode({**frame, field: ids[:-1]})), field) == ids[:-1]


def test_version_mismatch_message_names_both_versions() -> None:
    other = P.PROTOCOL_VERSION + 1
    with pytest.raises(P.ProtocolError, match=rf"v={other}.*v={P.PROTOCOL_VERSION}"):
        P.decode_request(msgspec.msgpack.encode({"v": other, "rid": 1, "op": "ping"}))


def test_structures_in_header_fields_are_neither_built_nor_quoted() -> None:
    """Any peer reaches the header decode, TCP peers without the secret too: an empty map is one byte
    on the wire and a Python dict in memory, and a quoted value goes back in the error reply."""
    import tracemalloc

    frame = msgspec.msgpack.encode({"v": [{}] * 200_000, "rid": 5, "op": "ping"})
    tracemalloc.start()
    try:
        with pytest.raises(P.ProtocolError) as info:
            P.decode_request(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == P.ErrorCode.VERSION_MISMATCH and info.value.rid == 5
    assert peak < len(frame)  # built as dicts it takes over 10 MB
    assert len(str(info.value)) < 400
    long_op = msgspec.msgpack.encode({"v": P.PROTOCOL_VERSION, "rid": 6, "op": "x" * 1_000_000})
    with pytest.raises(P.ProtocolError) as info:
        P.decode_request(long_op)
    assert info.value.code == P.ErrorCode.UNKNOWN_OP and info.value.rid == 6
    assert len(str(info.value)) < 1000
    too_large = msgspec.msgpack.encode({"v": P.PROTOCOL_VERSION, "rid": 7, "op": "ping", "tokens": [1] * 100})
    with pytest.raises(P.ProtocolError) as info:
        P.decode_request(too_large, max_bytes=50)
    assert info.value.code == P.ErrorCode.TOO_LARGE and info.value.rid == 7  # still matched to its request
    for rid in (True, -1, 1 << 63, 1.5, [5]):
        with pytest.raises(P.ProtocolError) as info:
            P.decode_request(msgspec.msgpack.encode({"v": 0, "rid": rid, "op": "ping"}))
        assert info.value.rid == -1


def test_oversized_frame_is_refused() -> None:
    with pytest.raises(P.ProtocolError) as info:
        P.decode_request(b"\0" * 100, max_bytes=10)
    assert info.value.code == P.ErrorCode.TOO_LARGE


def test_token_and_block_ids_decode_as_views_into_the_frame() -> None:
    """The server's I/O thread decodes every frame: a long prompt's ids are read in place, not copied
    (the frame lives as long as the request)."""
    tokens, blocks = list(range(5000)), [7, -1, 3]
    frame = P.encode(
        P.Store(
            rid=3,
            instance_id=1,
            tokens=P.tokens_to_bytes(tokens),
            block_ids=P.tokens_to_bytes(blocks),
            start=0,
            end=256,
        )
    )
    received = bytearray(frame)  # as the transport hands over a frame alone in its buffer
    req = P.decode_request(received)
    assert isinstance(req, P.Store)
    for ids, expected in ((req.tokens, tokens), (req.block_ids, blocks)):
        assert isinstance(ids, memoryview) and ids.obj is received
        assert P.wire_id_count(ids) == len(expected)
        array = P.ids_from_wire(ids, "ids")
        assert array.tolist() == expected and not array.flags.writeable
    assert P.wire_id_count([1, 2]) == 2 and P.wire_id_count(b"\0" * 16) == 2


def test_ids_from_wire_checks_byte_length() -> None:
    assert P.ids_from_wire(P.tokens_to_bytes([3, 4]), "t").tolist() == [3, 4]
    with pytest.raises(ValueError, match="int64"):
        P.ids_from_wire(b"\0" * 7, "tokens")
    with pytest.raises(ValueError, match="int64"):
        P.ids_from_wire(memoryview(b"\0" * 9), "tokens")


# ---- pool sharing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["file_descriptor", "file_system"])
def test_cpu_pool_mapping_shares_pages_both_ways(strategy: str) -> None:
    old = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy(strategy)
    try:
        pool = torch.zeros(4, 2, 2, 8, dtype=torch.bfloat16)
        pool.share_memory_()
        ptr = pool.data_ptr()
        desc = share_cpu_pool(pool)
        assert pool.data_ptr() == ptr  # describing never moves the storage
        assert (desc.fd is None) == (strategy == "file_system")
        mapped = open_pool(desc)
        try:
            mapped.tensor[1, 0, 1, 3] = 2.5  # the "server" writes, the client sees it
            assert pool[1, 0, 1, 3].item() == 2.5
            pool[3].fill_(-1)  # the client writes, the "server" sees it
            assert torch.equal(mapped.tensor[3], pool[3])
        finally:
            mapped.close()
    finally:
        tmp.set_sharing_strategy(old)


def test_cpu_pool_view_with_offset() -> None:
    base = torch.zeros(10, 2, 2, 8)
    base.share_memory_()
    pool = base[2:6]
    desc = share_cpu_pool(pool)
    assert desc.offset_bytes == 2 * 2 * 2 * 8 * 4
    mapped = open_pool(desc)
    mapped.tensor[0].fill_(7)
    assert torch.equal(base[2], torch.full((2, 2, 8), 7.0))
    assert base[1].abs().sum() == 0
    mapped.close()


def test_unshared_cpu_pool_is_refused_with_a_hint() -> None:
    with pytest.raises(PoolSharingError, match=r"share_memory_\(\)"):
        describe_pool(torch.zeros(4, 2, 2, 8))


def test_descriptor_that_does_not_fit_or_is_not_shm_is_refused() -> None:
    pool = torch.zeros(4, 2, 2, 8)
    pool.share_memory_()
    desc = share_cpu_pool(pool)
    too_big = msgspec.structs.replace(desc, shape=[400, 2, 2, 8])
    with pytest.raises(PoolSharingError, match="does not fit"):
        open_pool(too_big)
    with pytest.raises(PoolSharingError, match="dtype"):
        open_pool(msgspec.structs.replace(desc, dtype="complex64"))
    with tempfile.TemporaryFile() as f:  # a regular file, not shared memory
        f.write(b"\0" * 4096)
        f.flush()
        not_shm = msgspec.structs.replace(desc, fd=f.fileno(), file_bytes=4096)
        with pytest.raises(PoolSharingError, match="cannot be used") as refused:
            open_pool(not_shm)
        assert "tmp" not in str(refused.value)  # never where another process's descriptor points
    with pytest.raises(PoolSharingError, match="cannot be used"):
        open_pool(msgspec.structs.replace(desc, fd=999_999))
    with pytest.raises(PoolSharingError, match="cannot be used"):
        open_pool(msgspec.structs.replace(desc, file_inode=desc.file_inode + 1))


def test_cpu_pool_shared_with_a_child_process() -> None:
    """The descriptor works from another process (here: a spawned child writing into our pool)."""
    pool = torch.zeros(4, 2, 2, 8)
    pool.share_memory_()
    desc = share_cpu_pool(pool)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_child_writes, args=(msgspec.msgpack.encode(desc),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert torch.equal(pool[2], torch.full((2, 2, 8), 3.0))


def _child_writes(frame: bytes) -> None:
    desc = msgspec.msgpack.decode(frame, type=P.CpuShmPool)
    mapped = open_pool(desc)
    mapped.tensor[2].fill_(3.0)
    mapped.close()
    os._exit(0)


def test_raw_cuda_ipc_wrapper_refuses_cpu_tensors() -> None:
    with pytest.raises(PoolSharingError, match="CUDA tensor"):
        RawCudaIPCWrapper(torch.zeros(2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_descriptor_on_a_machine_without_cuda_gives_a_clear_error() -> None:
    desc = P.CudaIpcPool(
        shape=[4, 2, 2, 8],
        dtype="bfloat16",
        ipc_handle=b"\0" * 64,
        alloc_bytes=1 << 20,
        device_uuid="0" * 32,
    )
    with pytest.raises(PoolSharingError):
        open_pool(desc)
