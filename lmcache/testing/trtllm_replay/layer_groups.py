"""Layer groups (one per distinct effective attention window) and their paged pools.

V2 keeps one pool per layer group: ``[num_slots, layers_in_group, 2 (K|V), heads*tpb*head_dim]`` per
rank, so a group's page id addresses a slot of that group's pool only. V1 is the one-group case:
every layer in one full-attention group and one pool, exactly the V1 primary pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .block_pool import KvPool, PoolAllocator, zeros_pool


@dataclass(frozen=True)
class LayerGroup:
    """Layers sharing one attention window; ``window`` None = full attention."""

    group_id: int
    layer_ids: tuple[int, ...]
    window: int | None


def resolve_layer_groups(
    layer_windows: Sequence[int | None] | None, num_layers: int, max_position_embeddings: int
) -> list[LayerGroup]:
    """Group layers by effective window (a window >= ``max_position_embeddings`` is full attention);
    group ids are dense from 0 in order of each group's first layer."""
    windows = list(layer_windows) if layer_windows is not None else [None] * num_layers
    if len(windows) != num_layers:
        raise ValueError(f"layer_windows has {len(windows)} entries for {num_layers} layers")
    layers_of: dict[int | None, list[int]] = {}
    for layer, window in enumerate(windows):
        if window is not None and (isinstance(window, bool) or window < 1):
            raise ValueError(f"layer {layer}: attention window must be a positive int or None")
        effective = None if window is None or window >= max_position_embeddings else window
        layers_of.setdefault(effective, []).append(layer)
    return [LayerGroup(g, tuple(layers), w) for g, (w, layers) in enumerate(layers_of.items())]


class GroupedKvPool:
    """One ``KvPool`` per layer group; maps a global layer id to its group's pool and local index."""

    def __init__(
        self,
        groups: list[LayerGroup],
        *,
        num_blocks: int,
        num_kv_heads: int,
        head_dim: int,
        tokens_per_block: int,
        tp_size: int,
        dtype: torch.dtype,
        device: torch.device,
        local_ranks: Sequence[int] | None = None,
        allocate: PoolAllocator = zeros_pool,
    ) -> None:
        """``local_ranks``: the ranks whose pools live in this process (default: all); ``allocate``:
        how each local pool tensor is made."""
        self.groups = groups
        self.tokens_per_block = tokens_per_block
        self.pools = [
            KvPool(
                num_blocks=num_blocks,
                num_layers=len(g.layer_ids),
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                tokens_per_block=tokens_per_block,
                tp_size=tp_size,
                dtype=dtype,
                device=device,
                local_ranks=local_ranks,
                allocate=allocate,
            )
            for g in groups
        ]
        self._where = {layer: (g, i) for g in groups for i, layer in enumerate(g.layer_ids)}

    def locate(self, layer: int) -> tuple[LayerGroup, KvPool, int]:
        """(group, that group's pool, the layer's index inside the pool) of a global layer id."""
        group, local = self._where[layer]
        return group, self.pools[group.group_id], local
