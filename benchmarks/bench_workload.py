"""Two workloads in the shape of upstream LMCache's benchmarks, with and without the connector.

- ``multi_round_chat`` (like upstream's multi-round QA): ``--users`` users share a system prompt;
  each user starts with a long private history; round ``r`` of a user sends system prompt + history
  + every earlier question and answer + a new question. Users take turns (user 1 round 1, user 2
  round 1, ...), so by the time a user comes back the other users' requests have gone through the
  GPU pool.
- ``long_doc_qa`` (like upstream's long-document QA): ``--docs`` documents, ``--questions`` questions
  each; a request is document + question; questions are asked round-robin over the documents.

The GPU pool (``--gpu-pool-tokens``) is sized well below the workload's histories, so TRT-LLM's own
device block reuse cannot keep them. Both variants run the same device block reuse (full blocks,
keyed by their prefix, LRU among blocks no request holds; never the last prompt token): the
baseline is TRT-LLM with ``enable_block_reuse`` and no connector. The connector variant adds the
in-process engine (pinned CPU L1 big enough for the workload): ``lookup``, a load of the blocks
beyond the device hit (on the forward's stream), and after each request a ``store`` of its chunks
on a side stream.

What is modelled, and what is not (keep it honest):
- one request at a time, batch 1; real prefill cost (``prefill_model.py``, Qwen2-1.5B shape),
  launched op by op (no CUDA graphs: every request has its own shape), so each forward also pays
  the model's Python launch overhead, the same in both variants (it understates the connector's gain);
- TTFT = from the request's arrival (device block match, lookup, load) to its first token on the
  host (the prefill of the rest, then ``argmax().item()``);
- no decode: the answer is a fixed number (``--answer-tokens``) of fixed pseudo-random tokens,
  identical in both variants, whose KV is produced by one batched forward after the first token
  (a stand-in for the decode steps; its time counts in the total, not in TTFT). The next round's
  prompt includes it, as a chat client would send it;
- no queueing, arrival times or concurrency; total time = wall time of all requests back to back;
- the L1 arena is warmed (its pinned slabs allocated) before the timed run, as in a running server.

Checked: every connector load is the size promised, and every request's logits agree with the
baseline's within numeric noise (different batch split: ``max|a-b|/max|b| <= 0.1``, cosine >= 0.99
in bf16). Loads are checked bitwise in ``bench_ttft.py``.

    python benchmarks/bench_workload.py --device cuda [--out workload.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from prefill_model import (  # noqa: E402
    PrefillModel,
    add_model_args,
    build_model,
    describe,
    logits_close,
    random_tokens,
    sync,
    write_json,
)

from lmcache.config import LMCacheEngineConfig  # noqa: E402
from lmcache.engine import CacheEngine, KeySpace  # noqa: E402
from lmcache.layout import PoolLayout  # noqa: E402
from lmcache.transfer import BlockTransfer  # noqa: E402

GIB = 1 << 30


class BenchFailure(RuntimeError):
    pass


@dataclass
class Request:
    prompt: list[int]
    answer: list[int]


class DeviceCache:
    """TRT-LLM-style block reuse over a fixed pool: full blocks keyed by their prefix, LRU when free."""

    def __init__(self, num_blocks: int, tpb: int) -> None:
        self.tpb = tpb
        self.free = list(range(num_blocks - 1, -1, -1))
        self.cached: OrderedDict[int, int] = OrderedDict()  # prefix hash -> block, least recent first
        self.evictions = 0

    def hashes(self, tokens: Sequence[int]) -> list[int]:
        out, h = [], 0
        for i in range(len(tokens) // self.tpb):
            h = hash((h, tuple(tokens[i * self.tpb : (i + 1) * self.tpb])))
            out.append(h)
        return out

    def acquire(self, prompt: Sequence[int], total: int) -> tuple[list[int], int]:
        """Block ids for a request of ``total`` tokens, and how many leading blocks were reused."""
        reusable = self.hashes(prompt)[: (len(prompt) - 1) // self.tpb]
        blocks = []
        for h in reusable:
            block = self.cached.pop(h, None)  # held by this request now: not evictable
            if block is None:
                break
            blocks.append(block)
        reused = len(blocks)
        for _ in range(-(-total // self.tpb) - reused):
            if self.free:
                blocks.append(self.free.pop())
            elif self.cached:
                blocks.append(self.cached.popitem(last=False)[1])
                self.evictions += 1
            else:
                raise BenchFailure("GPU pool too small for one request")
        return blocks, reused

    def release(self, tokens: Sequence[int], blocks: list[int]) -> None:
        """The request finished: its full blocks become reusable (most recent), the rest free."""
        hashes = self.hashes(tokens)
        for i, block in enumerate(blocks):
            if i < len(hashes) and hashes[i] not in self.cached:
                self.cached[hashes[i]] = block
            else:
                self.free.append(block)


def multi_round_chat(args: argparse.Namespace, vocab: int) -> list[Request]:
    system = random_tokens(args.system_tokens, vocab, args.seed * 101 + 1)
    history = {
        u: system + random_tokens(args.history_tokens, vocab, args.seed * 101 + 10 + u)
        for u in range(args.users)
    }
    requests = []
    for r in range(args.rounds):
        for u in range(args.users):
            question = random_tokens(args.question_tokens, vocab, args.seed * 1009 + 1000 * u + 2 * r)
            answer = random_tokens(args.answer_tokens, vocab, args.seed * 1009 + 1000 * u + 2 * r + 1)
            prompt = history[u] + question
            requests.append(Request(prompt, answer))
            history[u] = prompt + answer
    return requests


def long_doc_qa(args: argparse.Namespace, vocab: int) -> list[Request]:
    docs = [random_tokens(args.doc_tokens, vocab, args.seed * 211 + 7 + d) for d in range(args.docs)]
    requests = []
    for q in range(args.questions):
        for d, doc in enumerate(docs):
            question = random_tokens(args.question_tokens, vocab, args.seed * 3001 + 100 * d + 2 * q)
            answer = random_tokens(args.answer_tokens, vocab, args.seed * 3001 + 100 * d + 2 * q + 1)
            requests.append(Request(doc + question, answer))
    return requests


class Runner:
    def __init__(self, model: PrefillModel, args: argparse.Namespace) -> None:
        self.model = model
        self.args = args
        self.dev = model.device
        self.cuda = self.dev.type == "cuda"
        self.num_blocks = args.gpu_pool_tokens // model.tpb
        self.pool = model.new_pool(self.num_blocks)
        layout = PoolLayout.of_pool(self.pool, model.tpb)
        layout.blocks_per_chunk(args.chunk_size)
        self.space = KeySpace("bench/prefill-model", layout)
        self.bpt = layout.bytes_per_token
        self.save_stream = torch.cuda.Stream(device=self.dev) if self.cuda else None

    def current(self) -> Any:
        return torch.cuda.current_stream(self.dev) if self.cuda else None

    def engine_for(self, requests: list[Request]) -> CacheEngine:
        chunk = self.args.chunk_size
        distinct = set()  # the workload's distinct chunks (prefix-chained), i.e. what L1 must hold
        for r in requests:
            full, h = r.prompt + r.answer, 0
            for i in range(len(full) // chunk):
                h = hash((h, tuple(full[i * chunk : (i + 1) * chunk])))
                distinct.add(h)
        gb = self.args.l1_gb if self.args.l1_gb else len(distinct) * chunk * self.bpt * 1.25 / GIB + 0.05
        engine = CacheEngine(
            LMCacheEngineConfig.from_defaults(chunk_size=self.args.chunk_size, max_local_cpu_size=gb)
        )
        # Warm the L1 arena (allocate its pinned slabs) as a running server's is: fill it, then clear.
        blocks = list(range(self.num_blocks))
        span = self.num_blocks * self.model.tpb // chunk * chunk
        for seed in range(2 + int(gb * GIB) // (span * self.bpt)):
            engine.store(
                self.space,
                0,
                self.pool,
                BlockTransfer(random_tokens(span, 7, 10**9 + seed), None, blocks, 0, span),
            )
            sync(self.dev)
        engine.clear()
        return engine

    def run(self, requests: list[Request], engine: CacheEngine | None) -> dict[str, Any]:
        model, tpb, dev = self.model, self.model.tpb, self.dev
        cache = DeviceCache(self.num_blocks, tpb)
        ttfts: list[float] = []
        logits_all: list[torch.Tensor] = []
        device_hit = loaded_total = prompt_total = prefilled = 0
        last_save: Any = None
        sync(dev)
        start = time.perf_counter()
        for rid, req in enumerate(requests):
            n, full = len(req.prompt), req.prompt + req.answer
            t0 = time.perf_counter()
            blocks, reused = cache.acquire(req.prompt, len(full))
            begin = reused * tpb
            if last_save is not None:
                self.current().wait_event(last_save)  # freed blocks may still be read by the last save
            if engine is not None:
                hit = engine.lookup(self.space, req.prompt, pin_id=rid)
                end = min(hit, n - 1) // tpb * tpb
                if end > begin:
                    got = engine.retrieve(
                        self.space,
                        0,
                        self.pool,
                        BlockTransfer(req.prompt, None, blocks, begin, end),
                        self.current(),
                        pin_id=rid,
                    )
                    if got != end - begin:
                        raise BenchFailure(f"request {rid}: promised {end - begin} tokens, loaded {got}")
                    loaded_total += got
                    begin = end
                else:
                    engine.release(rid)
            logits = model.prefill(self.pool, req.prompt[begin:], begin, blocks)
            int(logits.argmax().item())  # the first token reaches the host
            ttfts.append(time.perf_counter() - t0)
            logits_all.append(logits.cpu())
            device_hit += reused * tpb
            prompt_total += n
            prefilled += n - begin
            model.prefill(self.pool, req.answer, n, blocks)  # the answer's KV (stands in for decode)
            if engine is not None:
                if self.cuda:
                    self.save_stream.wait_stream(self.current())
                engine.store(
                    self.space,
                    0,
                    self.pool,
                    BlockTransfer(full, None, blocks, 0, len(full)),
                    self.save_stream,
                )
                if self.cuda:
                    last_save = torch.cuda.Event()
                    last_save.record(self.save_stream)
            cache.release(full, blocks)
        sync(dev)
        total = time.perf_counter() - start
        return {
            "requests": len(requests),
            "mean_ttft_ms": statistics.mean(ttfts) * 1e3,
            "p50_ttft_ms": statistics.median(ttfts) * 1e3,
            "max_ttft_ms": max(ttfts) * 1e3,
            "total_s": total,
            "prompt_tokens": prompt_total,
            "prefilled_tokens": prefilled,
            "device_hit_rate": device_hit / prompt_total,
            "lmcache_hit_rate": loaded_total / prompt_total,
            "hit_rate": (device_hit + loaded_total) / prompt_total,
            "device_evictions": cache.evictions,
            "_logits": logits_all,
        }

    def compare(
        self, name: str, requests: list[Request], params: dict[str, Any], last_round: int
    ) -> dict[str, Any]:
        """Both variants; ``last_round`` requests at the end hold every user's history / every document."""
        longest = max(len(r.prompt) + len(r.answer) for r in requests)
        if longest > self.args.gpu_pool_tokens:
            raise BenchFailure(f"{name}: a {longest}-token request does not fit the GPU pool")
        working_set = sum(len(r.prompt) + len(r.answer) for r in requests[-last_round:])
        engine = self.engine_for(requests)
        evictions = engine.l1.evictions  # those of the warm-up fill
        base = self.run(requests, None)
        conn = self.run(requests, engine)
        conn["l1_evictions"] = engine.l1.evictions - evictions
        worst_rel, worst_cos = 0.0, 1.0
        for i, (a, b) in enumerate(zip(conn.pop("_logits"), base.pop("_logits"), strict=True)):
            ok, m = logits_close(a, b, self.model.dtype)
            worst_rel, worst_cos = max(worst_rel, m["max_rel_diff"]), min(worst_cos, m["cosine"])
            if not ok:
                raise BenchFailure(f"{name}: request {i} logits differ from the baseline's {m}")
        engine.close()
        return {
            "params": params,
            "gpu_pool_tokens": self.args.gpu_pool_tokens,
            "working_set_tokens": working_set,
            "no_connector": base,
            "connector": conn,
            "ttft_speedup": base["mean_ttft_ms"] / conn["mean_ttft_ms"],
            "total_speedup": base["total_s"] / conn["total_s"],
            "logits_vs_baseline": {"max_rel_diff": worst_rel, "min_cosine": worst_cos},
        }


def main() -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    big = {
        "gpu_pool_tokens": 16384, "users": 8, "rounds": 4, "system_tokens": 1000, "history_tokens": 6000,
        "question_tokens": 100, "answer_tokens": 100, "docs": 8, "doc_tokens": 8000, "questions": 4,
    }  # fmt: skip
    small = {
        "gpu_pool_tokens": 512, "users": 3, "rounds": 3, "system_tokens": 64, "history_tokens": 128,
        "question_tokens": 16, "answer_tokens": 16, "docs": 3, "doc_tokens": 256, "questions": 2,
    }  # fmt: skip
    for key in big:
        parser.add_argument(
            "--" + key.replace("_", "-"),
            type=int,
            default=None,
            help=f"default {big[key]} (--small {small[key]})",
        )
    parser.add_argument(
        "--l1-gb", type=float, default=None, help="L1 size (default: the workload's distinct chunks +25 %%)"
    )
    parser.add_argument("--workloads", default="multi_round_chat,long_doc_qa")
    args = parser.parse_args()
    for key in big:
        if getattr(args, key) is None:
            setattr(args, key, (small if args.small else big)[key])
    model = build_model(args)
    model.cuda_graphs = False  # request shapes differ: a graph per shape would cost more than it saves
    results = describe(model, args)
    runner = Runner(model, args)
    # Warm-up: the kernels of short and long prefills, with and without a prefix.
    warm = random_tokens(min(args.gpu_pool_tokens // 2, 2048), model.dims.vocab, 5)
    blocks = list(range(runner.num_blocks))
    model.prefill(runner.pool, warm, 0, blocks)
    model.prefill(runner.pool, warm[:64], len(warm), blocks)
    sync(model.device)
    results["workloads"] = {}
    try:
        for name in args.workloads.split(","):
            if name == "multi_round_chat":
                requests = multi_round_chat(args, model.dims.vocab)
                keys = (
                    "users",
                    "rounds",
                    "system_tokens",
                    "history_tokens",
                    "question_tokens",
                    "answer_tokens",
                )
            elif name == "long_doc_qa":
                requests = long_doc_qa(args, model.dims.vocab)
                keys = ("docs", "doc_tokens", "questions", "question_tokens", "answer_tokens")
            else:
                raise BenchFailure(f"unknown workload {name!r}")
            params = {k: getattr(args, k) for k in keys}
            last_round = args.users if name == "multi_round_chat" else args.docs
            results["workloads"][name] = runner.compare(name, requests, params, last_round)
    except BenchFailure as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    pool = args.gpu_pool_tokens
    print(f"card: {results['card']}  model: {model.dims.name} {results['dtype']}  GPU pool {pool} tokens")
    head = f"{'hit rate':>10}{'(device':>9}{'lmcache)':>10}{'mean TTFT':>14}{'total':>11}"
    print(f"{'workload':<18}{'variant':<14}{head}")
    for name, w in results["workloads"].items():
        for variant in ("no_connector", "connector"):
            r = w[variant]
            print(
                f"{name:<18}{variant:<14}{r['hit_rate']:>10.1%}{r['device_hit_rate']:>9.1%}{r['lmcache_hit_rate']:>10.1%}"
                f"{r['mean_ttft_ms']:>11.2f} ms{r['total_s']:>9.3f} s"
            )
        print(f"{'':<18}speedup: TTFT {w['ttft_speedup']:.2f}x, total {w['total_speedup']:.2f}x")
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
