"""lmcache.dma_batch on the CPU: the C loops and the Python references enqueue the same calls.

Both are given stand-ins for ``cudaMemcpyAsync``, ``cudaMemcpy2DAsync`` and ``cudaMemcpyBatchAsync``
(ctypes callbacks of their signatures that copy host memory and record each call), so what they
enqueue is checked byte for byte without a GPU.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from lmcache import dma_batch

NATIVE = dma_batch.native_loops()
IMPLEMENTATIONS = {"python": dma_batch.enqueue_python, "native": NATIVE[0] if NATIVE else None}
IMPLEMENTATIONS_2D = {"python": dma_batch.enqueue_2d_python, "native": NATIVE[1] if NATIVE else None}
IMPLEMENTATIONS_BATCH = {"python": dma_batch.enqueue_batch_python, "native": NATIVE[2] if NATIVE else None}


class FakeMemcpy:
    """A ``cudaMemcpyAsync`` that copies host memory at once; ``fail_at`` makes that call return 700."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[int, int, int, int, int]] = []
        self.fail_at = fail_at
        self.function = dma_batch.MEMCPY_ASYNC(self._call)  # kept alive as long as this object
        self.address = ctypes.cast(self.function, ctypes.c_void_p).value

    def _call(self, dst: int, src: int, count: int, kind: int, stream: int) -> int:
        if len(self.calls) == self.fail_at:
            return 700
        self.calls.append((dst, src, count, kind, stream or 0))
        ctypes.memmove(dst, src, count)
        return 0


def built(run: dma_batch.Enqueue | None) -> dma_batch.Enqueue:
    """An implementation of the table, refusing the C one when the extension was not built."""
    assert run is not None, "lmcache._dmabatch is not built (setup.py build_ext)"
    return run


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def implementation(request: pytest.FixtureRequest) -> dma_batch.Enqueue:
    return built(IMPLEMENTATIONS[request.param])


@pytest.fixture(params=sorted(IMPLEMENTATIONS_2D))
def implementation_2d(request: pytest.FixtureRequest) -> dma_batch.Enqueue:
    return built(IMPLEMENTATIONS_2D[request.param])


class FakeMemcpy2d:
    """A ``cudaMemcpy2DAsync`` that copies host memory line by line at once; records each call."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[int, ...]] = []
        self.fail_at = fail_at
        self.function = dma_batch.MEMCPY_2D_ASYNC(self._call)
        self.address = ctypes.cast(self.function, ctypes.c_void_p).value

    def _call(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: int, _: int
    ) -> int:
        if len(self.calls) == self.fail_at:
            return 1
        self.calls.append((dst, dpitch, src, spitch, width, height, kind))
        for line in range(height):
            ctypes.memmove(dst + line * dpitch, src + line * spitch, width)
        return 0


def test_the_native_loops_are_built() -> None:
    from lmcache import _dmabatch

    assert dma_batch.native_loops() == (_dmabatch.enqueue, _dmabatch.enqueue_2d, _dmabatch.enqueue_batch)


def test_copies_land_and_continuations_join(implementation: dma_batch.Enqueue) -> None:
    src = torch.arange(64, dtype=torch.uint8)
    dst = torch.zeros(64, dtype=torch.uint8)
    s, d = src.data_ptr(), dst.data_ptr()
    fake = FakeMemcpy()
    # 0-8 and 8-16 continue each other on both sides: one call; 16-24 goes elsewhere: its own call;
    # an empty copy is dropped; 40-48 continues 32-40 on the destination side only: two calls.
    copies = [
        (d, s, 8),
        (d + 8, s + 8, 8),
        (d + 40, s + 16, 8),
        (d + 1, s, 0),
        (d + 24, s + 32, 8),
        (d + 32, s + 48, 8),
    ]
    calls = implementation(fake.address, 1234, copies)
    assert calls == 4
    assert [(c[0] - d, c[1] - s, c[2]) for c in fake.calls] == [
        (0, 0, 16),
        (40, 16, 8),
        (24, 32, 8),
        (32, 48, 8),
    ]
    assert all(c[3] == dma_batch.MEMCPY_DEFAULT and c[4] == 1234 for c in fake.calls)
    want = torch.zeros(64, dtype=torch.uint8)
    want[0:16] = src[0:16]
    want[40:48] = src[16:24]
    want[24:32] = src[32:40]
    want[32:40] = src[48:56]
    assert torch.equal(dst, want)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ((1, 2), "must be a"),
        ([1, 2, 3], "must be a"),
        ((0, 8, 4), "null address"),
        ((8, 0, 4), "null address"),
        ((8, 16, -1), "negative"),
        ((-8, 16, 4), "non-negative ints"),
        ((8.0, 16, 4), "non-negative ints"),
        ((8, 16, True), "non-negative ints"),
    ],
)
def test_bad_copies_raise_before_anything_is_enqueued(
    implementation: dma_batch.Enqueue, bad: object, message: str
) -> None:
    src = torch.arange(16, dtype=torch.uint8)
    dst = torch.zeros(16, dtype=torch.uint8)
    fake = FakeMemcpy()
    good = (dst.data_ptr(), src.data_ptr(), 16)
    with pytest.raises(ValueError, match=message):
        implementation(fake.address, 0, [good, bad])  # type: ignore[list-item]
    assert fake.calls == [] and not dst.any()


def test_a_failing_call_stops_the_batch_and_names_the_error(implementation: dma_batch.Enqueue) -> None:
    src = torch.arange(32, dtype=torch.uint8)
    dst = torch.zeros(32, dtype=torch.uint8)
    s, d = src.data_ptr(), dst.data_ptr()
    fake = FakeMemcpy(fail_at=1)
    with pytest.raises(RuntimeError, match=r"8 bytes \(call 2 of 3\) failed with CUDA error 700"):
        implementation(fake.address, 0, [(d, s, 8), (d + 16, s + 16, 8), (d + 8, s + 8, 8)])
    assert len(fake.calls) == 1  # the third copy was never enqueued


def test_a_null_runtime_function_is_refused(implementation: dma_batch.Enqueue) -> None:
    with pytest.raises(ValueError, match="null memcpy_async"):
        implementation(0, 0, [])


def test_2d_copies_land_line_by_line(implementation_2d: dma_batch.Enqueue) -> None:
    """Column 2-4 of a 6x8 host matrix into a 6x3 one, and 2 lines of 4 bytes into a wider pitch;
    an empty copy is dropped."""
    src = torch.arange(48, dtype=torch.uint8).view(6, 8)
    dst = torch.zeros(6, 3, dtype=torch.uint8)
    wide = torch.zeros(2, 10, dtype=torch.uint8)
    fake = FakeMemcpy2d()
    copies = [
        (dst.data_ptr(), 3, src.data_ptr() + 2, 8, 3, 6),
        (wide.data_ptr(), 0, src.data_ptr(), 8, 0, 4),
        (wide.data_ptr() + 1, 10, src.data_ptr() + 8, 8, 4, 2),
    ]
    assert implementation_2d(fake.address, 77, copies) == 2
    assert [c[4:] for c in fake.calls] == [(3, 6, dma_batch.MEMCPY_DEFAULT), (4, 2, dma_batch.MEMCPY_DEFAULT)]
    assert torch.equal(dst, src[:, 2:5])
    assert torch.equal(wide[:, 1:5], src[1:3, 0:4]) and not wide[:, 5:].any() and not wide[:, 0].any()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ((8, 8, 8, 8, 8), "must be a"),
        ((0, 8, 16, 8, 8, 2), "null address"),
        ((8, 8, 16, 8, -8, 2), "negative"),
        ((8, 4, 16, 8, 8, 2), "at least the width"),
        ((8, 8, 16, 4, 8, 2), "at least the width"),
        ((8, 8, 16, 8, 8.0, 2), "must be an int"),
        ((8, 8, 16, 8, 8, True), "must be an int"),
    ],
)
def test_bad_2d_copies_raise_before_anything_is_enqueued(
    implementation_2d: dma_batch.Enqueue, bad: object, message: str
) -> None:
    src = torch.arange(16, dtype=torch.uint8)
    dst = torch.zeros(16, dtype=torch.uint8)
    fake = FakeMemcpy2d()
    good = (dst.data_ptr(), 8, src.data_ptr(), 8, 8, 2)
    with pytest.raises(ValueError, match=message):
        implementation_2d(fake.address, 0, [good, bad])  # type: ignore[list-item]
    assert fake.calls == [] and not dst.any()


def test_a_failing_2d_call_stops_the_batch(implementation_2d: dma_batch.Enqueue) -> None:
    src = torch.arange(16, dtype=torch.uint8)
    dst = torch.zeros(16, dtype=torch.uint8)
    fake = FakeMemcpy2d(fail_at=0)
    with pytest.raises(RuntimeError, match=r"2 x 4 bytes \(call 1 of 2\) failed with CUDA error 1"):
        implementation_2d(fake.address, 0, [(dst.data_ptr(), 4, src.data_ptr(), 4, 4, 2)] * 2)
    assert fake.calls == [] and not dst.any()


class FakeStream:
    """What :func:`lmcache.dma_batch.enqueue` reads of a ``torch.cuda.Stream``."""

    cuda_stream = 4321


def test_without_the_c_loops_batches_go_through_python_and_say_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake, fake_2d = FakeMemcpy(), FakeMemcpy2d()
    addresses = {"cudaMemcpyAsync": fake.address, "cudaMemcpy2DAsync": fake_2d.address}
    monkeypatch.setattr(dma_batch, "_runtime_function", addresses.get)
    monkeypatch.setattr(dma_batch, "_batch_function", lambda: None)  # a runtime before CUDA 13
    monkeypatch.setattr(dma_batch, "_native", None)
    monkeypatch.setattr(dma_batch, "_told_python", False)
    src = torch.arange(32, dtype=torch.uint8)
    dst = torch.zeros(32, dtype=torch.uint8)
    with caplog.at_level("WARNING", logger="lmcache"):
        assert (
            dma_batch.enqueue(
                [(dst.data_ptr(), src.data_ptr(), 8), (dst.data_ptr() + 8, src.data_ptr() + 8, 8)],
                FakeStream(),
            )
            == 1
        )
        assert (
            dma_batch.enqueue_2d([(dst.data_ptr() + 16, 8, src.data_ptr() + 16, 8, 8, 2)], FakeStream()) == 1
        )
    assert torch.equal(dst, src)
    assert fake.calls[0][4] == FakeStream.cuda_stream
    assert [m for m in caplog.messages if "lmcache._dmabatch is not built" in m] == [caplog.messages[0]]


def test_without_a_cuda_runtime_a_batch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dma_batch, "_runtime_function", lambda name: None)
    monkeypatch.setattr(dma_batch, "_batch_function", lambda: None)
    with pytest.raises(RuntimeError, match="copies need a CUDA device"):
        dma_batch.enqueue([(8, 16, 8)], FakeStream())
    with pytest.raises(dma_batch.Dma2dUnavailable, match="LMCACHE_USE_LAYERWISE=false"):
        dma_batch.enqueue_2d([(8, 8, 16, 8, 8, 1)], FakeStream())


class FakeMemcpyBatch:
    """A ``cudaMemcpyBatchAsync`` that copies host memory at once; records each call's copies,
    attributes and stream; ``error`` makes every call return it."""

    def __init__(self, error: int = 0) -> None:
        self.calls: list[tuple[list[tuple[int, int, int]], list[int], int]] = []
        self.error = error
        self.function = dma_batch.MEMCPY_BATCH_ASYNC(self._call)
        self.address = ctypes.cast(self.function, ctypes.c_void_p).value

    def _call(
        self, dsts: int, srcs: int, sizes: int, count: int, attrs: int, idxs: int, num_attrs: int, stream: int
    ) -> int:
        if self.error:
            return self.error
        d = (ctypes.c_void_p * count).from_address(dsts)
        s = (ctypes.c_void_p * count).from_address(srcs)
        n = (ctypes.c_size_t * count).from_address(sizes)
        copies = [(d[i] or 0, s[i] or 0, n[i]) for i in range(count)]
        attr = dma_batch.MemcpyAttributes.from_address(attrs)
        first = (ctypes.c_size_t * num_attrs).from_address(idxs)
        self.calls.append((copies, [attr.src_access_order, attr.flags, num_attrs, first[0]], stream or 0))
        for dst, src, nbytes in copies:
            ctypes.memmove(dst, src, nbytes)
        return 0


@pytest.fixture(params=sorted(IMPLEMENTATIONS_BATCH))
def implementation_batch(request: pytest.FixtureRequest) -> dma_batch.Enqueue:
    return built(IMPLEMENTATIONS_BATCH[request.param])


def test_a_batch_is_one_call_of_the_joined_runs_read_in_stream_order(
    implementation_batch: dma_batch.Enqueue,
) -> None:
    src = torch.arange(64, dtype=torch.uint8)
    dst = torch.zeros(64, dtype=torch.uint8)
    s, d = src.data_ptr(), dst.data_ptr()
    fake = FakeMemcpyBatch()
    copies = [(d, s, 8), (d + 8, s + 8, 8), (d + 40, s + 16, 8), (d + 1, s, 0), (d + 24, s + 32, 8)]
    assert implementation_batch(fake.address, 1234, copies) == 1
    [(runs, attrs, stream)] = fake.calls
    assert [(r[0] - d, r[1] - s, r[2]) for r in runs] == [(0, 0, 16), (40, 16, 8), (24, 32, 8)]
    assert attrs == [dma_batch.SRC_ACCESS_ORDER_STREAM, 0, 1, 0] and stream == 1234
    want = torch.zeros(64, dtype=torch.uint8)
    want[0:16], want[40:48], want[24:32] = src[0:16], src[16:24], src[32:40]
    assert torch.equal(dst, want)
    assert implementation_batch(fake.address, 1234, [(d, s, 0)]) == 0  # nothing left: no call
    assert len(fake.calls) == 1


@pytest.mark.parametrize(("bad", "message"), [((0, 8, 4), "null address"), ((8, 16, -1), "negative")])
def test_a_bad_copy_in_a_batch_enqueues_nothing(
    implementation_batch: dma_batch.Enqueue, bad: object, message: str
) -> None:
    fake = FakeMemcpyBatch()
    src = torch.arange(16, dtype=torch.uint8)
    dst = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=message):
        implementation_batch(fake.address, 7, [(dst.data_ptr(), src.data_ptr(), 16), bad])  # type: ignore[list-item]
    assert fake.calls == [] and not dst.any()
    with pytest.raises(ValueError, match="null memcpy_batch_async"):
        implementation_batch(0, 7, [])


def test_a_failing_batch_names_the_error(implementation_batch: dma_batch.Enqueue) -> None:
    src = torch.arange(16, dtype=torch.uint8)
    dst = torch.zeros(16, dtype=torch.uint8)
    # Held by name: its callback is freed with it, and the cycle collector may run during the call.
    failing = FakeMemcpyBatch(error=1)
    with pytest.raises(RuntimeError, match=r"cudaMemcpyBatchAsync of 2 copies failed with CUDA error 1"):
        implementation_batch(
            failing.address,
            7,
            [(dst.data_ptr(), src.data_ptr(), 4), (dst.data_ptr() + 8, src.data_ptr(), 4)],
        )


@pytest.mark.parametrize("native", [True, False])
def test_enqueue_batches_except_on_the_legacy_default_stream(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    fake, fake_batch = FakeMemcpy(), FakeMemcpyBatch()
    monkeypatch.setattr(dma_batch, "_runtime_function", {"cudaMemcpyAsync": fake.address}.get)
    monkeypatch.setattr(dma_batch, "_batch_function", lambda: fake_batch.address)
    if not native:
        monkeypatch.setattr(dma_batch, "_native", None)
        monkeypatch.setattr(dma_batch, "_told_python", True)
    src = torch.arange(32, dtype=torch.uint8)
    dst = torch.zeros(32, dtype=torch.uint8)
    rows = [(dst.data_ptr() + 16 * i, src.data_ptr() + 16 * (1 - i), 16) for i in range(2)]
    assert dma_batch.batches_on(FakeStream())
    assert dma_batch.enqueue(rows, FakeStream()) == 1
    assert len(fake_batch.calls) == 1 and fake.calls == []
    assert fake_batch.calls[0][2] == FakeStream.cuda_stream
    assert torch.equal(dst, torch.cat([src[16:], src[:16]]))

    class DefaultStream:
        cuda_stream = 0

    dst.zero_()
    assert not dma_batch.batches_on(DefaultStream())
    assert dma_batch.enqueue(rows, DefaultStream()) == 2  # one cudaMemcpyAsync per copy, in order
    assert len(fake.calls) == 2 and len(fake_batch.calls) == 1
    assert torch.equal(dst, torch.cat([src[16:], src[:16]]))
