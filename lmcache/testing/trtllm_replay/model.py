"""A tiny deterministic decoder LM whose attention reads and writes K/V in the paged pool.

Why it exists: a connector's loads are only proven if the model really consumes what was loaded.
Every layer writes each token's K/V into its rank's pool slab and reads the prefix back from the
pool blocks of the request, so a wrong, missing or misplaced block changes the logits.

Why token by token: the K/V of a token must be bitwise identical whether the prefix was computed
in one prefill, in chunks, reused from the device, or loaded by a connector. Processing one token
at a time with identical shapes (the attention key length depends only on the position) makes
every number independent of batch composition and chunking, on CPU and on CUDA.

Sliding windows: a layer with window ``W`` lets the query at position ``q`` see key ``p`` only if
``q - p < W`` or ``p`` is one of the first ``sink_tokens`` (attention sinks), and it reads only the
pages holding those keys; a page listed ``-1`` that the layer still needs raises instead of being read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layer_groups import GroupedKvPool, LayerGroup, resolve_layer_groups
from .ranks import LocalRanks, Ranks


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the tiny Llama-like model (RMSNorm, RoPE, GQA attention, SwiGLU MLP)."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    dtype: torch.dtype = torch.float32
    layer_windows: tuple[int | None, ...] | None = None  # per-layer attention window; None = full
    sink_tokens: int = 0
    """The first tokens every sliding-window layer keeps seeing (attention sinks); their pages stay."""

    def __post_init__(self) -> None:
        if self.sink_tokens < 0:
            raise ValueError("sink_tokens must not be negative")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (RoPE)")
        if min(self.vocab_size, self.hidden_size, self.num_layers, self.intermediate_size) < 1:
            raise ValueError("model dimensions must be positive")
        self.layer_groups()  # validates layer_windows

    def layer_groups(self) -> list[LayerGroup]:
        """One group per distinct effective window, ids dense from 0 by first layer."""
        return resolve_layer_groups(self.layer_windows, self.num_layers, self.max_position_embeddings)


@dataclass
class ForwardItem:
    """One request's share of a forward: compute ``tokens`` at positions ``start..``;
    ``block_ids[g][i]`` is the page of block ordinal ``i`` in layer group ``g`` (``-1`` = none)."""

    tokens: list[int]
    start: int
    block_ids: list[list[int]]
    want_logits: bool


@dataclass
class _GroupPages:
    ids: list[int]
    tensor: torch.Tensor
    leading: int  # ordinals before this one have pages (sink pages before a -1 run)
    first_valid: int  # ordinals from this one on have pages; those between the two are -1

    def has(self, first: int, last: int) -> bool:
        """Whether every ordinal of ``[first, last)`` has a page."""
        return first >= last or last <= self.leading or first >= self.first_valid


LayerHook = Callable[[int], None]


class TinyDecoder:
    """Seeded weights; tensor parallelism splits KV heads (and their query groups) across ranks."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        tp_size: int = 1,
        ranks: Ranks | None = None,
    ) -> None:
        """``ranks``: where the TP ranks live (default: all in this process). Each process computes
        attention for its ranks' KV heads from their pools and gathers the other ranks' outputs."""
        if config.num_kv_heads % tp_size:
            raise ValueError(f"num_kv_heads={config.num_kv_heads} must be divisible by tp={tp_size}")
        self.ranks = ranks if ranks is not None else LocalRanks(tp_size)
        if self.ranks.size != tp_size:
            raise ValueError(f"{self.ranks.size} ranks for tp={tp_size}")
        self.config = config
        self.device = torch.device(device)
        self.tp_size = tp_size
        c = config
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape: int, std: float) -> torch.Tensor:
            w = torch.randn(*shape, generator=gen, dtype=torch.float32) * std
            return w.to(device=self.device, dtype=c.dtype)

        def norm_weight() -> torch.Tensor:
            return (1.0 + 0.1 * torch.randn(c.hidden_size, generator=gen)).to(self.device, c.dtype)

        qkv_out = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        self.embed = rand(c.vocab_size, c.hidden_size, std=1.0)
        self.layers = []
        for _ in range(c.num_layers):
            self.layers.append(
                {
                    "attn_norm": norm_weight(),
                    "qkv": rand(qkv_out, c.hidden_size, std=1 / math.sqrt(c.hidden_size)),
                    "o": rand(
                        c.hidden_size, c.num_heads * c.head_dim, std=1 / math.sqrt(c.num_heads * c.head_dim)
                    ),
                    "mlp_norm": norm_weight(),
                    "gate_up": rand(2 * c.intermediate_size, c.hidden_size, std=1 / math.sqrt(c.hidden_size)),
                    "down": rand(c.hidden_size, c.intermediate_size, std=1 / math.sqrt(c.intermediate_size)),
                }
            )
        self.final_norm = norm_weight()
        self.lm_head = rand(c.vocab_size, c.hidden_size, std=1 / math.sqrt(c.hidden_size))
        half = c.head_dim // 2
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(half, dtype=torch.float64) / half))
        angles = torch.arange(c.max_position_embeddings, dtype=torch.float64)[:, None] * inv_freq[None, :]
        self._cos = angles.cos().to(self.device, c.dtype)
        self._sin = angles.sin().to(self.device, c.dtype)

    # --- building blocks ----------------------------------------------------------------
    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return x32.to(x.dtype) * weight

    def _rope(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        half = self.config.head_dim // 2
        cos, sin = self._cos[pos], self._sin[pos]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def _attention(
        self, layer: int, x: torch.Tensor, pos: int, pages: list[_GroupPages], pools: GroupedKvPool
    ) -> torch.Tensor:
        c, w = self.config, self.layers[layer]
        group, pool, local = pools.locate(layer)
        page = pages[group.group_id]
        tpb = pool.tokens_per_block
        lowest = 0 if group.window is None else max(0, pos - group.window + 1)  # oldest visible key
        first = lowest // tpb
        sink = min(c.sink_tokens, lowest)  # sink keys not inside the window
        sink_blocks = -(-sink // tpb)
        for lo, hi in ((0, sink_blocks), (first, pos // tpb + 1)):
            if not page.has(lo, hi):
                missing = next(o for o in range(lo, hi) if page.ids[o] < 0)
                raise RuntimeError(
                    f"layer {layer} at position {pos} needs block ordinal {missing} of group "
                    f"{group.group_id}, which is -1 in {page.ids}"
                )
        h = self._rms_norm(x, w["attn_norm"])
        qkv = F.linear(h, w["qkv"])[0]
        nq, nkv, d = c.num_heads, c.num_kv_heads, c.head_dim
        q = self._rope(qkv[: nq * d].view(nq, d), pos)
        k = self._rope(qkv[nq * d : (nq + nkv) * d].view(nkv, d), pos)
        v = qkv[(nq + nkv) * d :].view(nkv, d)
        kv_per_rank, group = nkv // self.tp_size, nq // nkv
        block, offset = page.ids[pos // tpb], pos % tpb
        outs = []
        for rank in self.ranks.local:
            heads = slice(rank * kv_per_rank, (rank + 1) * kv_per_rank)
            pool.write(rank, local, block, offset, k[heads], v[heads])
            # Read back from this rank's pool: only the pages holding visible keys.
            keys, values = pool.gather(rank, local, page.tensor[first:], pos + 1 - first * tpb)
            if lowest > first * tpb:
                keys, values = keys[:, lowest - first * tpb :], values[:, lowest - first * tpb :]
            if sink:
                sink_keys, sink_values = pool.gather(rank, local, page.tensor[:sink_blocks], sink)
                keys, values = torch.cat((sink_keys, keys), dim=1), torch.cat((sink_values, values), dim=1)
            keys = keys.to(c.dtype).repeat_interleave(group, dim=0)
            values = values.to(c.dtype).repeat_interleave(group, dim=0)
            q_rank = q[rank * kv_per_rank * group : (rank + 1) * kv_per_rank * group]
            out = F.scaled_dot_product_attention(q_rank[:, None, :], keys, values)
            outs.append(out.reshape(1, -1))
        return x + F.linear(torch.cat(self.ranks.gather_heads(outs), dim=1), w["o"])

    def _mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w = self.layers[layer]
        h = self._rms_norm(x, w["mlp_norm"])
        gate, up = F.linear(h, w["gate_up"]).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w["down"])

    def _pages(self, ids: list[int]) -> _GroupPages:
        leading = next((i for i, page in enumerate(ids) if page < 0), len(ids))
        first_valid = next((i for i in range(leading, len(ids)) if ids[i] >= 0), len(ids))
        if leading == len(ids):
            first_valid = 0  # no -1 at all
        if any(page < 0 for page in ids[first_valid:]):
            raise ValueError(f"-1 pages must form one run of the block list (after any sink pages): {ids}")
        tensor = torch.tensor(ids, dtype=torch.long, device=self.device)
        return _GroupPages(ids, tensor, leading, first_valid)

    # --- forward ------------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        items: list[ForwardItem],
        pools: GroupedKvPool,
        pre_layer: LayerHook | None = None,
        post_layer: LayerHook | None = None,
    ) -> list[torch.Tensor | None]:
        """Layer-major over the batch (so per-layer hooks bracket each layer); float32 logits of
        each item's last token where ``want_logits``."""
        c = self.config
        hidden: list[list[torch.Tensor]] = []
        pages: list[list[_GroupPages]] = []
        for item in items:
            if item.start + len(item.tokens) > c.max_position_embeddings:
                raise ValueError("sequence longer than max_position_embeddings")
            tok = torch.tensor(item.tokens, dtype=torch.long, device=self.device)
            hidden.append([self.embed[tok[j : j + 1]] for j in range(len(item.tokens))])
            pages.append([self._pages(ids) for ids in item.block_ids])
        for layer in range(c.num_layers):
            if pre_layer is not None:
                pre_layer(layer)
            for item, states, item_pages in zip(items, hidden, pages, strict=True):
                for j in range(len(states)):
                    x = self._attention(layer, states[j], item.start + j, item_pages, pools)
                    states[j] = self._mlp(layer, x)
            if post_layer is not None:
                post_layer(layer)
        logits: list[torch.Tensor | None] = []
        for item, states in zip(items, hidden, strict=True):
            if not item.want_logits or not states:
                logits.append(None)
                continue
            h = self._rms_norm(states[-1], self.final_norm)
            logits.append(F.linear(h, self.lm_head)[0].float())
        return logits
