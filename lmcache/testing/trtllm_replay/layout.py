"""TRT-LLM's V2 KV cache layout objects (``connectors/kv_cache_layout.py`` on main), for the replay.

Under V2 a worker receives ``register_kv_cache_layout(layout)`` instead of ``register_kv_caches``.
Here every region is a byte view of a real pool tensor (the region keeps a reference to it), so a
write through ``slot_tensor``/``as_tensor`` reaches the pages the model reads. The replay builds
one region per layer group spanning the whole slot (``stride == size``), as V2 does for uniform
models; buffers are listed layer-major, K before V.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class KvCacheBufferRef:
    """One buffer of a page: a layer's ``"key"`` or ``"value"`` (``expansion`` 1 here)."""

    layer_id: int
    role: str
    expansion: int = 1


@dataclass(frozen=True)
class KvCacheRegion:
    """Slot ``i`` lives at ``base + stride * i`` for ``size`` bytes; ``num_slots`` slots."""

    base: int
    size: int
    stride: int
    num_slots: int
    buffers: tuple[KvCacheBufferRef, ...]
    _bytes: torch.Tensor = field(repr=False, compare=False)  # [num_slots, size] uint8 view

    @classmethod
    def of_pool(cls, pool: torch.Tensor, buffers: tuple[KvCacheBufferRef, ...]) -> KvCacheRegion:
        """The whole-slot region of a contiguous ``[num_slots, ...]`` pool tensor."""
        if not pool.is_contiguous():
            raise ValueError("a pool tensor must be contiguous")
        as_bytes = pool.view(pool.shape[0], -1).view(torch.uint8)
        size = as_bytes.shape[1]
        return cls(pool.data_ptr(), size, size, pool.shape[0], buffers, as_bytes)

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} outside [0, {self.num_slots})")

    def address_of(self, slot: int) -> int:
        """Device address of ``slot``; IndexError outside ``[0, num_slots)``."""
        self._check(slot)
        return self.base + self.stride * slot

    def slot_tensor(self, slot: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """View of one slot's ``size`` bytes as ``dtype``; IndexError outside ``[0, num_slots)``."""
        self._check(slot)
        return self._bytes[slot].view(dtype)

    def as_tensor(self, dtype: torch.dtype) -> torch.Tensor:
        """Unchecked strided ``[num_slots, size // itemsize]`` view."""
        return self._bytes.view(dtype)


@dataclass(frozen=True)
class KvCacheLayerGroupLayout:
    """One layer group: global ``layer_ids``, ``window_size`` (None = full attention), regions."""

    layer_group_id: int
    layer_ids: tuple[int, ...]
    window_size: int | None
    regions: tuple[KvCacheRegion, ...]

    @property
    def bytes_per_page(self) -> int:
        return sum(region.size for region in self.regions)


@dataclass(frozen=True)
class KvCacheLayout:
    """What ``register_kv_cache_layout`` receives: every layer group of one rank."""

    tokens_per_block: int
    groups: tuple[KvCacheLayerGroupLayout, ...]
    dtype: torch.dtype

    def group(self, layer_group_id: int) -> KvCacheLayerGroupLayout:
        """The group with that id; KeyError if none."""
        for group in self.groups:
            if group.layer_group_id == layer_group_id:
                return group
        raise KeyError(f"no layer group {layer_group_id}")

    def group_of_layer(self, global_layer_id: int) -> KvCacheLayerGroupLayout:
        """The group holding a global layer id; KeyError if none."""
        for group in self.groups:
            if global_layer_id in group.layer_ids:
                return group
        raise KeyError(f"no layer group holds layer {global_layer_id}")

    def as_single_pool_tensor(self) -> torch.Tensor | None:
        """The V1-style ``[num_slots, num_layers, kv_factor, block_size]`` view, or None unless
        there is one group with one region whose buffers split evenly per layer."""
        if len(self.groups) != 1 or len(self.groups[0].regions) != 1:
            return None
        group, (region,) = self.groups[0], self.groups[0].regions
        num_layers, num_buffers = len(group.layer_ids), len(region.buffers)
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        if num_buffers % num_layers or any(b.expansion != 1 for b in region.buffers):
            return None
        if region.size % (itemsize * num_buffers):
            return None
        block_size = region.size // itemsize // num_buffers
        return region.as_tensor(self.dtype).view(
            region.num_slots, num_layers, num_buffers // num_layers, block_size
        )


def build_layout(
    tokens_per_block: int, groups: list[tuple[int, tuple[int, ...], int | None, torch.Tensor]]
) -> KvCacheLayout:
    """Layout of one rank from ``(group id, global layer ids, window, pool tensor)`` per group;
    each pool is ``[num_slots, len(layer_ids), 2, block_elems]``."""
    built = []
    dtype = groups[0][3].dtype
    for group_id, layer_ids, window, pool in groups:
        buffers = tuple(KvCacheBufferRef(layer, role) for layer in layer_ids for role in ("key", "value"))
        built.append(
            KvCacheLayerGroupLayout(group_id, layer_ids, window, (KvCacheRegion.of_pool(pool, buffers),))
        )
    return KvCacheLayout(tokens_per_block, tuple(built), dtype)
