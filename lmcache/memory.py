"""Pinned host memory for chunk buffers: a byte budget that grows lazily in slabs.

Asking the host allocator (``cudaHostAlloc``) per chunk costs milliseconds and fragments
pinned memory, so chunk buffers are fixed-size slots carved out of large slabs. Nothing is
reserved until the first slot is needed: a 10 GiB cap starts instantly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

DEFAULT_SLAB_BYTES = 256 << 20


def pinned_memory_available() -> bool:
    return torch.cuda.is_available()


@dataclass(eq=False)
class HostBuffer:
    """One slot of a slab; ``data`` is a uint8 view of ``nbytes`` bytes."""

    pool: SlotPool
    slab: int
    slot: int
    data: torch.Tensor

    def view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        return self.data[: numel * dtype.itemsize].view(dtype).view(shape)


class SlotPool:
    """Fixed-size slots for one chunk size; O(1) allocate and free from a free list."""

    def __init__(self, arena: HostArena, slot_bytes: int) -> None:
        self.arena = arena
        self.slot_bytes = slot_bytes
        self._slabs: list[torch.Tensor | None] = []
        self._used: list[int] = []
        self._free: list[tuple[int, int]] = []

    def allocate(self) -> HostBuffer | None:
        """A free slot, growing by one slab if the arena's budget allows; None when full."""
        with self.arena.lock:
            if not self._free and not self._grow():
                return None
            slab, slot = self._free.pop()
            self._used[slab] += 1
            tensor = self._slabs[slab]
            assert tensor is not None
            start = slot * self.slot_bytes
            return HostBuffer(self, slab, slot, tensor[start : start + self.slot_bytes])

    def free(self, buf: HostBuffer) -> None:
        with self.arena.lock:
            self._used[buf.slab] -= 1
            self._free.append((buf.slab, buf.slot))

    def release_empty_slabs(self) -> int:
        """Give wholly free slabs back to the arena (when another chunk size needs the budget)."""
        released = 0
        with self.arena.lock:
            for i, tensor in enumerate(self._slabs):
                if tensor is not None and self._used[i] == 0:
                    released += tensor.numel()
                    self._slabs[i] = None
                    self._free = [(s, k) for s, k in self._free if s != i]
            self.arena.reserved_bytes -= released
        return released

    def _grow(self) -> bool:
        room = self.arena.capacity_bytes - self.arena.reserved_bytes
        slots = min(max(1, self.arena.slab_bytes // self.slot_bytes), room // self.slot_bytes)
        if slots < 1:
            return False
        tensor = torch.empty(slots * self.slot_bytes, dtype=torch.uint8, pin_memory=self.arena.pinned)
        self.arena.reserved_bytes += tensor.numel()
        index = self._slabs.index(None) if None in self._slabs else len(self._slabs)
        if index == len(self._slabs):
            self._slabs.append(tensor)
            self._used.append(0)
        else:
            self._slabs[index] = tensor
        self._free.extend((index, k) for k in reversed(range(slots)))
        return True


class HostArena:
    """The host-memory budget of the L1 tier, shared by one slot pool per chunk size."""

    def __init__(
        self, capacity_bytes: int, *, pinned: bool | None = None, slab_bytes: int = DEFAULT_SLAB_BYTES
    ) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.slab_bytes = slab_bytes
        self.pinned = pinned_memory_available() if pinned is None else pinned
        self.reserved_bytes = 0
        self.lock = threading.RLock()
        self._pools: dict[int, SlotPool] = {}

    def pool(self, slot_bytes: int) -> SlotPool:
        with self.lock:
            if slot_bytes not in self._pools:
                self._pools[slot_bytes] = SlotPool(self, slot_bytes)
            return self._pools[slot_bytes]

    def reclaim(self, keep: SlotPool) -> int:
        """Release empty slabs of every pool but ``keep``; returns bytes released."""
        with self.lock:
            return sum(p.release_empty_slabs() for p in self._pools.values() if p is not keep)
