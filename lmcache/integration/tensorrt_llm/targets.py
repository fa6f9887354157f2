"""The pools a worker registers: TRT-LLM's single pool tensor (V1), or a V2 ``KvCacheLayout``.

Each pool target is one memory region of one layer group, seen as rows of pages
``[num_slots, *row_shape]`` (each row contiguous; rows may be strided). Targets are keyed apart
(``key_suffix``): the same tokens hold different KV in each group and region.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from lmcache.integration.tensorrt_llm.plan import TargetId


@dataclass(frozen=True)
class PoolTarget:
    """One pool the cache keys separately, with the attention window of its layer group."""

    target: TargetId
    tensor: torch.Tensor
    key_suffix: str = ""
    window: int | None = None


def targets_of_pool(pool: torch.Tensor, window: int | None = None) -> list[PoolTarget]:
    """TRT-LLM's primary pool ``[num_blocks, num_layers, kv_factor, block_elems]`` (V1, or one group),
    every layer attending to the last ``window`` tokens (None: all of them)."""
    return [PoolTarget(TargetId(0, 0), pool, _window_suffix(window), window)]


def _window_suffix(window: int | None) -> str:
    """A sliding window's KV differs from full attention's past the window: keyed apart."""
    return "" if window is None else f"#w{window}"


def targets_of_layout(layout: Any) -> list[PoolTarget]:
    """Every region of every layer group of a V2 layout.

    A layout of one group and one region whose single-pool view exists is registered as that view,
    keyed like a V1 pool of the same window. Otherwise each region is registered as raw pages
    (bytes) and keyed by its group, region index, window and buffer list.
    """
    groups = list(layout.groups)
    if len(groups) == 1 and len(groups[0].regions) == 1:
        single = layout.as_single_pool_tensor()
        if single is not None:
            return targets_of_pool(single, _window(groups[0]))
    targets = []
    for group in groups:
        for index, region in enumerate(group.regions):
            pages = region.as_tensor(torch.uint8)
            rows = pages.as_strided((pages.shape[0], 1, 1, pages.shape[1]), (pages.stride(0), 0, 0, 1))
            group_id = int(group.layer_group_id)
            suffix = f"#lg{group_id}.r{index}.w{_window(group) or 'full'}.{_buffers_digest(region)}"
            targets.append(PoolTarget(TargetId(group_id, index), rows, suffix, _window(group)))
    return targets


def _window(group: Any) -> int | None:
    window = getattr(group, "window_size", None)
    return None if window is None else int(window)


def _buffers_digest(region: Any) -> str:
    """Which layers and roles a region's bytes hold, in memory order."""
    parts = [
        f"{getattr(b, 'layer_id', '?')}:{getattr(b, 'role', '?')}:{getattr(b, 'expansion', 1)}"
        for b in getattr(region, "buffers", ()) or ()
    ]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=6).hexdigest()
