"""A Qwen2-1.5B-shaped decoder that prefills through TensorRT-LLM's paged KV pool, for the benchmarks.

Shared by ``bench_ttft.py``, ``bench_overhead.py`` and ``bench_workload.py``. The model has the real
model's dimensions (28 layers, hidden 1536, 12 query heads, 2 KV heads, head dim 128, intermediate
8960, vocab 151936; QKV bias, RMSNorm, RoPE with theta 1e6, SwiGLU), random seeded weights, bf16 on
CUDA (float32 on CPU), and does the real compute of a batched prefill:

- the K/V of the new tokens are written into the pool ``[num_blocks, num_layers, 2,
  num_kv_heads * tokens_per_block * head_dim]`` (TRT-LLM's layout: one block's row holds every
  layer, K then V, each ``[num_kv_heads, tokens_per_block, head_dim]``, i.e. HND inside a block);
- attention reads the whole prefix back from the pool blocks of the request (so KV loaded by a
  connector is what the model consumes) through ``torch.nn.functional.scaled_dot_product_attention``;
- a prefill may start at position ``start`` after ``start`` tokens already in the pool (loaded or
  reused): attention is causal over the prefix and the new tokens (bottom-right aligned);
- only the last position goes through the LM head: the returned logits are the first token's, so
  the time to them is the time to first token;
- on CUDA each fixed-shape forward is captured once as a CUDA graph and replayed (``--eager``
  turns that off): an engine like TensorRT-LLM launches a layer as a few fused kernels from C++,
  this model as ~50 PyTorch ops from Python, and that launch overhead (30-60 ms per forward on the
  GPU host's CPU) would otherwise dominate every short prefill.

``--small`` is a 2-layer, hidden-128 model for CPU smoke runs. Run this file to measure the
prefill rate (compare with 110-138k tok/s for Qwen2-1.5B on an H100 at >= 4k tokens):

    python benchmarks/prefill_model.py [--device cuda] [--tokens 1024,4096,16384]
"""

from __future__ import annotations

import os

# cuBLAS is bitwise reproducible for identical shapes when its workspace is not shared between
# streams; the benchmarks compare logits bitwise, so pin the workspace config before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402


@dataclass(frozen=True)
class ModelDims:
    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6


QWEN2_1_5B = ModelDims("qwen2-1.5b-shape", 28, 1536, 12, 2, 128, 8960, 151936)
SMALL = ModelDims("small", 2, 128, 4, 2, 32, 256, 1024)


class PrefillModel:
    """Seeded random weights; ``prefill`` writes K/V into a paged pool and returns last-token logits."""

    def __init__(
        self,
        dims: ModelDims,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        tokens_per_block: int = 32,
        seed: int = 0,
        cuda_graphs: bool = False,
    ) -> None:
        self.dims = d = dims
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[Any, ...], tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._graph_pool: Any = None
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tpb = tokens_per_block
        if d.num_heads % d.num_kv_heads or d.head_dim % 2:
            raise ValueError("num_heads must be a multiple of num_kv_heads and head_dim even")
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def rand(*shape: int, std: float) -> torch.Tensor:
            w = torch.randn(*shape, generator=gen, device=self.device, dtype=torch.float32)
            return (w * std).to(self.dtype)

        def norm() -> torch.Tensor:
            return (1.0 + 0.1 * torch.randn(d.hidden, generator=gen, device=self.device)).to(self.dtype)

        qkv_out = (d.num_heads + 2 * d.num_kv_heads) * d.head_dim
        self.embed = rand(d.vocab, d.hidden, std=1.0)
        self.layers: list[dict[str, torch.Tensor]] = []
        for _ in range(d.num_layers):
            self.layers.append(
                {
                    "attn_norm": norm(),
                    "qkv_w": rand(qkv_out, d.hidden, std=d.hidden**-0.5),
                    "qkv_b": rand(qkv_out, std=0.1),
                    "o": rand(d.hidden, d.num_heads * d.head_dim, std=(d.num_heads * d.head_dim) ** -0.5),
                    "mlp_norm": norm(),
                    "gate_up": rand(2 * d.intermediate, d.hidden, std=d.hidden**-0.5),
                    "down": rand(d.hidden, d.intermediate, std=d.intermediate**-0.5),
                }
            )
        self.final_norm = norm()
        self.lm_head = rand(d.vocab, d.hidden, std=d.hidden**-0.5)
        half = d.head_dim // 2
        exponent = torch.arange(half, dtype=torch.float64, device=self.device) / half
        self.inv_freq = (1.0 / d.rope_theta**exponent).float()

    # -- pool geometry -------------------------------------------------------------------------

    @property
    def block_elems(self) -> int:
        return self.dims.num_kv_heads * self.tpb * self.dims.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        d = self.dims
        return 2 * d.num_layers * d.num_kv_heads * d.head_dim * self.dtype.itemsize

    def new_pool(self, num_blocks: int) -> torch.Tensor:
        """A zeroed pool ``[num_blocks, num_layers, 2, num_kv_heads * tokens_per_block * head_dim]``."""
        shape = (num_blocks, self.dims.num_layers, 2, self.block_elems)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.tpb)

    # -- forward -------------------------------------------------------------------------------

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.dims.rms_eps)
        return x32.to(self.dtype) * weight

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x32 = x.float()
        x1, x2 = x32[..., :half], x32[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def token_tensor(self, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(tokens, torch.Tensor):
            return tokens.to(self.device, torch.long)
        return torch.tensor(list(tokens), dtype=torch.long).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def prefill(
        self,
        pool: torch.Tensor,
        tokens: Sequence[int] | torch.Tensor,
        start: int,
        block_ids: Sequence[int] | torch.Tensor,
        *,
        graph: bool | None = None,
        pre_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Compute ``tokens`` at positions ``start..``; positions ``< start`` must already be in the pool.

        ``block_ids[j]`` holds positions ``[j * tokens_per_block, (j + 1) * tokens_per_block)``.
        Returns the float32 logits ``[vocab]`` of the last token (enqueued on the current stream).
        ``graph`` (default: ``self.cuda_graphs``) replays a CUDA graph of this shape, captured on
        first use (see :meth:`_replay`). ``pre_layer(i)`` runs on the host before layer ``i`` is
        launched, as TRT-LLM's ``wait_for_layer_load`` hook; with graphs each layer is then a graph
        of its own (:meth:`_replay_layers`).
        """
        ids = self.token_tensor(tokens)
        n = int(ids.numel())
        if n == 0:
            raise ValueError("prefill needs at least one token")
        nb = self.blocks_for(start + n)
        if len(block_ids) < nb:
            raise ValueError(f"{len(block_ids)} block ids cannot hold {start + n} tokens")
        if isinstance(block_ids, torch.Tensor):
            blocks = block_ids[:nb].to(self.device, torch.long)
        else:
            blocks = torch.tensor(list(block_ids[:nb]), dtype=torch.long).to(self.device, non_blocking=True)
        if self.cuda_graphs if graph is None else graph:
            if pre_layer is not None:
                return self._replay_layers(pool, ids, start, blocks, pre_layer)
            return self._replay(pool, ids, start, blocks)
        return self._forward(pool, ids, start, blocks, pre_layer)

    def _replay_layers(
        self,
        pool: torch.Tensor,
        ids: torch.Tensor,
        start: int,
        blocks: torch.Tensor,
        pre_layer: Callable[[int], None],
    ) -> torch.Tensor:
        """:meth:`_replay` with the prologue, each layer and the epilogue captured as graphs of their own
        (one pool, replayed in capture order), ``pre_layer(i)`` called before layer ``i``'s replay: a
        layer is one launch, as a serving engine's fused kernels are, and the hook can still order it."""
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        key = ("layers", pool.data_ptr(), int(ids.numel()), start, int(blocks.numel()))
        entry = self._graphs.get(key)
        if entry is None:
            static_ids, static_blocks = self._before_capture(pool, ids, start, blocks)
            prologue, layers, epilogue = self._stages(pool, static_ids, start, static_blocks)
            graphs = []
            for step in [prologue, *layers]:
                graphs.append(torch.cuda.CUDAGraph())
                with torch.cuda.graph(graphs[-1], pool=self._graph_pool):
                    step()
            graphs.append(torch.cuda.CUDAGraph())
            with torch.cuda.graph(graphs[-1], pool=self._graph_pool):
                out = epilogue()
            entry = self._graphs[key] = (graphs, static_ids, static_blocks, out)
        graphs, static_ids, static_blocks, out = entry
        static_ids.copy_(ids)
        static_blocks.copy_(blocks)
        graphs[0].replay()
        for layer, graph in enumerate(graphs[1:-1]):
            pre_layer(layer)
            graph.replay()
        graphs[-1].replay()
        return out.clone()

    def _before_capture(
        self, pool: torch.Tensor, ids: torch.Tensor, start: int, blocks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Static copies of a shape's inputs, after one forward on a side stream (the kernels'
        workspaces and handles exist before a capture), and the graphs' memory pool."""
        static_ids, static_blocks = ids.clone(), blocks.clone()
        current = torch.cuda.current_stream(self.device)
        warmup = torch.cuda.Stream(self.device)
        warmup.wait_stream(current)
        with torch.cuda.stream(warmup):
            self._forward(pool, static_ids, start, static_blocks)
        current.wait_stream(warmup)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return static_ids, static_blocks

    def _replay(
        self, pool: torch.Tensor, ids: torch.Tensor, start: int, blocks: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`_forward` as a CUDA graph, captured once per (pool, tokens, start, blocks) shape.

        A serving engine launches a layer as a few fused kernels from C++; this model launches about
        50 small PyTorch ops per layer from Python, which on a slow host CPU costs 30-60 ms per
        forward whatever its length, and would swamp a short prefill after a cached prefix. Replaying
        a graph leaves only the kernels' own time, like the engine. Same kernels for every replay of
        a shape, so its results stay bitwise reproducible.
        """
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        key = (pool.data_ptr(), int(ids.numel()), start, int(blocks.numel()))
        entry = self._graphs.get(key)
        if entry is None:
            static_ids, static_blocks = self._before_capture(pool, ids, start, blocks)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                out = self._forward(pool, static_ids, start, static_blocks)
            entry = self._graphs[key] = (graph, static_ids, static_blocks, out)
        graph, static_ids, static_blocks, out = entry
        static_ids.copy_(ids)
        static_blocks.copy_(blocks)
        graph.replay()
        return out.clone()

    def _forward(
        self,
        pool: torch.Tensor,
        ids: torch.Tensor,
        start: int,
        blocks: torch.Tensor,
        pre_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """The forward on device tensors only (no host sync, so it can be captured); ``pre_layer(i)``
        runs before layer ``i`` (TRT-LLM's per-layer connector hook)."""
        prologue, layers, epilogue = self._stages(pool, ids, start, blocks)
        prologue()
        for layer, run_layer in enumerate(layers):
            if pre_layer is not None:
                pre_layer(layer)
            run_layer()
        return epilogue()

    def _stages(
        self, pool: torch.Tensor, ids: torch.Tensor, start: int, blocks: torch.Tensor
    ) -> tuple[Callable[[], None], list[Callable[[], None]], Callable[[], torch.Tensor]]:
        """The forward as a prologue, one step per layer and an epilogue, run in that order; they hand
        the hidden state over in a dict, so each can be captured as a CUDA graph of its own."""
        d, tpb = self.dims, self.tpb
        n = int(ids.numel())
        total, nb = start + n, int(blocks.numel())
        nq, nkv, hd = d.num_heads, d.num_kv_heads, d.head_dim
        pool6 = pool.view(pool.shape[0], d.num_layers, 2, nkv, tpb, hd)
        if start == 0:
            mask, causal = None, n > 1
        else:
            mask, causal = (causal_lower_right(n, total) if n > 1 else None), False
        st: dict[str, torch.Tensor] = {}

        def prologue() -> None:
            pos = torch.arange(start, total, device=self.device)
            st["write_block"], st["write_off"] = blocks[pos // tpb], pos % tpb
            angles = pos.float()[:, None] * self.inv_freq[None, :]
            st["cos"], st["sin"] = angles.cos()[:, None, :], angles.sin()[:, None, :]
            st["x"] = self.embed[ids]

        def layer_step(layer: int) -> None:
            w, x = self.layers[layer], st["x"]
            write_block, write_off, cos, sin = st["write_block"], st["write_off"], st["cos"], st["sin"]
            h = self._rms(x, w["attn_norm"])
            q, k, v = F.linear(h, w["qkv_w"], w["qkv_b"]).split([nq * hd, nkv * hd, nkv * hd], dim=-1)
            q = self._rope(q.view(n, nq, hd), cos, sin)
            k = self._rope(k.view(n, nkv, hd), cos, sin)
            pool6[write_block, layer, 0, :, write_off] = k
            pool6[write_block, layer, 1, :, write_off] = v.reshape(n, nkv, hd)
            # Read the whole prefix back from the request's blocks: [nkv, total, hd]; the attention
            # kernel maps each group of query heads to its KV head (no copy per query head).
            keys = pool6[blocks, layer, 0].transpose(0, 1).reshape(nkv, nb * tpb, hd)[None, :, :total]
            values = pool6[blocks, layer, 1].transpose(0, 1).reshape(nkv, nb * tpb, hd)[None, :, :total]
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True
            )
            x = x + F.linear(attn[0].transpose(0, 1).reshape(n, nq * hd), w["o"])
            h = self._rms(x, w["mlp_norm"])
            gate, up = F.linear(h, w["gate_up"]).chunk(2, dim=-1)
            st["x"] = x + F.linear(F.silu(gate) * up, w["down"])

        def epilogue() -> torch.Tensor:
            h = self._rms(st["x"][-1:], self.final_norm)
            return F.linear(h, self.lm_head)[0].float()

        layers = [functools.partial(layer_step, layer) for layer in range(d.num_layers)]
        return prologue, layers, epilogue


# -- helpers shared by the benchmarks ------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="2-layer hidden-128 model (CPU smoke runs)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    parser.add_argument("--tokens-per-block", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eager",
        action="store_true",
        help="launch every op from Python instead of replaying CUDA graphs of fixed-shape forwards",
    )
    parser.add_argument("--out", help="write the results as JSON here")


def build_model(args: argparse.Namespace) -> PrefillModel:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    dims = SMALL if args.small else QWEN2_1_5B
    graphs = args.device.startswith("cuda") and not args.eager
    return PrefillModel(
        dims, args.device, dtype, tokens_per_block=args.tokens_per_block, seed=args.seed, cuda_graphs=graphs
    )


def describe(model: PrefillModel, args: argparse.Namespace) -> dict[str, Any]:
    """The run's setup for the JSON: card, model shape, dtype, block and chunk sizes."""
    out: dict[str, Any] = {
        "device": model.device.type,
        "card": card_name(model.device),
        "torch": torch.__version__,
        "model": asdict(model.dims),
        "dtype": str(model.dtype).removeprefix("torch."),
        "tokens_per_block": model.tpb,
        "chunk_size": args.chunk_size,
        "kv_bytes_per_token": model.kv_bytes_per_token,
        "cuda_graphs": model.cuda_graphs,
    }
    return out


def card_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device | str) -> tuple[float, Any]:
    """Seconds of ``fn()`` including its device work (synchronized before and after), and its result."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(seconds) * 1e3,
        "min_ms": min(seconds) * 1e3,
        "max_ms": max(seconds) * 1e3,
        "samples": len(seconds),
    }


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def logits_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> tuple[bool, dict[str, float]]:
    """Whether two logit vectors agree within the numeric noise of ``dtype``.

    Used where the two sides compute the same function with different batch splits (a full prefill
    vs a prefill after a load), which is bitwise equal in no dtype. Loose on purpose: the strict
    checks of a load are bitwise (the loaded KV rows, and the logits against device reuse).
    """
    got, want = got.double().cpu(), want.double().cpu()
    rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    cos = float(F.cosine_similarity(got, want, dim=0))
    tol_rel, tol_cos = (1e-3, 0.99999) if dtype == torch.float32 else (0.1, 0.99)
    return (rel <= tol_rel and cos >= tol_cos), {"max_rel_diff": rel, "cosine": cos}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(path: str | None, results: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--tokens", default="1024,4096,16384", help="prompt lengths, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = build_model(args)
    lengths = [int(s) for s in args.tokens.split(",")]
    pool = model.new_pool(model.blocks_for(max(lengths)))
    blocks = list(range(pool.shape[0]))
    results = describe(model, args)
    results["prefill"] = []
    print(f"{model.dims.name} on {results['card']} ({results['dtype']})")
    for n in lengths:
        toks = random_tokens(n, model.dims.vocab, n)
        model.prefill(pool, toks, 0, blocks)
        times = [
            timed(lambda t=toks: model.prefill(pool, t, 0, blocks), model.device)[0]
            for _ in range(args.repeats)
        ]
        row = {"tokens": n, **summary_ms(times), "tok_per_s": n / statistics.median(times)}
        results["prefill"].append(row)
        print(f"{n:>7} tokens: {row['median_ms']:9.2f} ms  {row['tok_per_s'] / 1e3:8.1f}k tok/s")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
