import pytest
import torch

from lmcache import c_ops


def pool(n: int = 16, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, 2, 64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("ids", [[0, 1, 2, 3], [5, 2, 9, 1], [15], [7, 8, 3, 4]])
def test_gather_then_scatter_round_trip(dtype: torch.dtype, ids: list[int]) -> None:
    src = pool(dtype=torch.float32).mul(10).to(dtype)
    out = torch.empty((len(ids), *src.shape[1:]), dtype=dtype)
    c_ops.gather_to_host(src, [(ids, out)])
    assert torch.equal(out, src[ids])
    dst = torch.zeros_like(src)
    targets = [(i + 3) % 16 for i in ids]
    c_ops.scatter_from_host(dst, [(targets, out)])
    assert torch.equal(dst[targets], src[ids])
    untouched = [b for b in range(16) if b not in targets]
    assert torch.count_nonzero(dst[untouched]) == 0


def test_several_chunks_in_one_call() -> None:
    src = pool()
    a = torch.empty(2, 3, 2, 64)
    b = torch.empty(3, 3, 2, 64)
    c_ops.gather_to_host(src, [([4, 5], a), ([9, 1, 0], b)])
    assert torch.equal(a, src[[4, 5]]) and torch.equal(b, src[[9, 1, 0]])


def test_contiguous_runs() -> None:
    assert c_ops.is_contiguous_run([3, 4, 5])
    assert not c_ops.is_contiguous_run([3, 5])


@pytest.mark.parametrize("ids", [[16], [-1], [0, 99]])
def test_out_of_range_block_ids_rejected_before_any_copy(ids: list[int]) -> None:
    src = pool()
    before = src.clone()
    with pytest.raises(IndexError, match="block ids"):
        c_ops.scatter_from_host(
            src, [([0], torch.zeros(1, 3, 2, 64)), (ids, torch.zeros(len(ids), 3, 2, 64))]
        )
    assert torch.equal(src, before)


def test_empty_block_list_rejected() -> None:
    with pytest.raises(ValueError):
        c_ops.gather_to_host(pool(), [([], torch.empty(0, 3, 2, 64))])


def test_block_runs_coalesce_adjacent_ids() -> None:
    assert c_ops.block_runs([4, 5, 6, 9, 10, 2]) == [(0, 4, 3), (3, 9, 2), (5, 2, 1)]
    assert c_ops.block_runs([7]) == [(0, 7, 1)]


def test_adjacent_host_buffers_are_joined_into_one_copy() -> None:
    slab = torch.zeros(7, 3, 2, 64)
    a, b, c = slab[0:2], slab[2:5], slab[6:7]  # a and b back to back, c after a gap
    joined = c_ops.join_adjacent([([4, 5], a), ([9, 1, 0], b), ([3], c)])
    assert [ids for ids, _ in joined] == [[4, 5, 9, 1, 0], [3]]
    span = joined[0][1]
    assert span.data_ptr() == a.data_ptr() and span.shape == (5, 3, 2, 64)
    assert joined[1][1] is c


def test_buffers_of_other_storages_or_out_of_order_stay_apart() -> None:
    slab = torch.zeros(4, 3, 2, 64)
    other = torch.zeros(2, 3, 2, 64)
    reverse = [([1], slab[1:2]), ([0], slab[0:1])]  # adjacent, but the second comes first in memory
    assert len(c_ops.join_adjacent(reverse)) == 2
    assert len(c_ops.join_adjacent([([0], slab[2:4]), ([1], other)])) == 2
    flat = torch.zeros(8)
    transposed, after = flat[0:4].view(2, 2).t(), flat[4:8].view(2, 2)  # back to back, one transposed
    assert len(c_ops.join_adjacent([([0], transposed), ([1], after)])) == 2
    assert len(c_ops.join_adjacent([([0], flat[0:4].view(2, 2)), ([1], after)])) == 1


def test_joined_copies_round_trip_through_a_scattered_pool() -> None:
    src = pool()
    slab = torch.empty(6, 3, 2, 64)
    chunks = [([3, 4], slab[0:2]), ([9, 0], slab[2:4]), ([5, 6], slab[4:6])]
    c_ops.gather_to_host(src, chunks)
    assert torch.equal(slab, src[[3, 4, 9, 0, 5, 6]])
    dst = torch.zeros_like(src)
    c_ops.scatter_from_host(dst, [([1, 2], slab[0:2]), ([12, 7], slab[2:4]), ([13, 14], slab[4:6])])
    assert torch.equal(dst[[1, 2, 12, 7, 13, 14]], slab)
    assert torch.count_nonzero(dst[[0, 3, 4, 5, 6, 8, 9, 10, 11, 15]]) == 0


def test_batches_index_one_upload_of_the_request_block_ids() -> None:
    request = [9, 4, 7, 1, 8, 3, 4, 6]
    transfer = c_ops.Transfer(pool(), block_ids=request)
    first = transfer.device_index([4, 7, 1])
    uploaded = transfer.request_index
    assert first.tolist() == [4, 7, 1] and uploaded is not None
    assert first.data_ptr() == uploaded[1:].data_ptr()
    for ids, at in (([8, 3], 4), ([4], 6)):  # searched from where the previous batch ended
        index = transfer.device_index(ids)
        assert index.tolist() == ids and transfer.request_index is uploaded
        assert index.data_ptr() == uploaded[at:].data_ptr()
    # Ids that are no slice of the request's after the last batch: their own upload.
    for ids in ([9, 4], [6, 1], [5], [4, 6, 2]):
        own = transfer.device_index(ids)
        assert own.tolist() == ids
        assert own.untyped_storage().data_ptr() != uploaded.untyped_storage().data_ptr()
    assert c_ops.Transfer(pool()).device_index([3, 2]).tolist() == [3, 2]


def test_lane_segments_split_copies_in_order_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(c_ops, "LANE_SEGMENT_BYTES", 100)
    copies = [(0, 1000, 40), (40, 1040, 40), (80, 1080, 40), (120, 2000, 300), (420, 3000, 10)]
    assert c_ops.lane_segments(copies) == [copies[:2], copies[2:3], copies[3:4], copies[4:]]
    assert c_ops.lane_segments([]) == []
