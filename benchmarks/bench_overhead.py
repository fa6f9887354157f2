"""What the in-process connector costs the forward path, with a Qwen2-1.5B-shaped model.

(a) ``connector_iteration``: time per iteration of a serving loop at 0 % hits, with the engine
    operations the in-process adapter performs per iteration vs no connector at all:

    - ``prefill``: every iteration is a new request of ``--prefill-tokens`` unique tokens, in
      TRT-LLM's order. With the connector: the scheduler's ``lookup`` (hashes the prompt, misses),
      the forward, then what the in-process adapter's ``wait_for_save`` does right after the
      forward is enqueued: it hands the ``store`` of the newly computed chunks to its ``SaveQueue``
      (the saver thread). Then sampling: the first token's ``argmax`` and its copy to pinned host
      memory are enqueued, and ``get_finished`` releases the save's copies after them
      (``SaveFence``). The host waits for the tokens as TRT-LLM's default (overlap) executor loop
      does, those of the previous iteration once this one's forward is enqueued, so the GPU always
      has the next forward; ``prefill_no_overlap`` waits for its own before the next iteration
      (``disable_overlap_scheduler``), so every host cost adds. Blocks alternate between two
      regions; a region is rewritten only after the device waited for its save (as TRT-LLM keeps
      a request's blocks until its saves are reported done). L1 holds 4 prompts, so it evicts in
      steady state.
    - ``decode``: one request decodes ``--decode-steps`` tokens one by one after a
      ``--decode-context``-token prefill; with the connector, every chunk that fills up is stored
      on the side stream after the step that completed it (``save_decode_cache``).

    Reported: mean ms per iteration (median over ``--repeats`` loops, connector and baseline
    alternating) and their ratio. The planner's own Python bookkeeping is not included. Beside them,
    ``plain_copy``: the same loop with no connector but one plain pinned ``copy_`` of each prompt's KV
    bytes on a side stream after its forward, before sampling: what a save made the naive way costs
    (the connector's saves go in interleaved batches of rows instead). On CUDA,
    ``forward_device_ms`` splits a longer iteration: the forward itself slowed on the device, or
    time between forwards; ``token_copy_ms`` is how long after the forward its first token reached
    the host.

(b) ``saves_in_flight``: the time of a forward (a ``--prefill-tokens`` prefill, and a decode
    step at ``--decode-context``, ms per step over ``--decode-steps-in-flight`` steps launched one
    after the other, about as many as a 32k save's copies take) while the store of a
    ``--save-tokens`` prefix (adjacent blocks, and scattered blocks, which need device gathers) was
    just handed to the ``SaveQueue`` (the saver thread hashes, reserves and enqueues while the
    forward launches), vs the same forwards with nothing in flight. Timed from after the hand-off to
    the end of the last forward (the forward's stream only); ``launch_*_ms`` is the host time until
    the forwards are enqueued (where a saver
    holding the GIL shows first), ``store_enqueue_ms`` the executor thread's host time of the
    hand-off, and ``saves_still_running`` the fraction of repeats where the save had not finished when the
    last forward did (for the prefill: the overlap really happened; for the decode steps, a fraction
    under one says the steps outlasted the save). ``ratio_host_done`` repeats the measurement with
    the forward started only once the saver thread's host work is done: what is left is the
    device-side overlap (copy engine, gather kernels), so the two ratios split an overhead
    between host (the GIL) and device. On CPU, stores are synchronous copies: the ratio means
    nothing there.

    On CUDA, fixed-shape forwards replay CUDA graphs (``prefill_model.py``); decode steps of (a)
    change shape every step and run op by op.

    python benchmarks/bench_overhead.py --device cuda [--out overhead.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
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
    random_tokens,
    sync,
    write_json,
)

from lmcache import cudart  # noqa: E402
from lmcache.chunk_copy import CopyStart  # noqa: E402
from lmcache.config import LMCacheEngineConfig  # noqa: E402
from lmcache.engine import CacheEngine, KeySpace  # noqa: E402
from lmcache.forward_gate import FORWARD  # noqa: E402
from lmcache.integration.tensorrt_llm.save_fence import SaveFence  # noqa: E402
from lmcache.integration.tensorrt_llm.save_queue import SaveQueue  # noqa: E402
from lmcache.layout import PoolLayout  # noqa: E402
from lmcache.transfer import BlockTransfer  # noqa: E402

GIB = 1 << 30


class BenchFailure(RuntimeError):
    pass


class Setup:
    def __init__(self, model: PrefillModel, args: argparse.Namespace) -> None:
        self.model = model
        self.args = args
        self.dev = model.device
        self.cuda = self.dev.type == "cuda"
        p, c, d, s = args.prefill_tokens, args.decode_context, args.decode_steps, args.save_tokens
        sizes = {"r0": p, "r1": p, "decode": c + d + 1, "save": s}
        self.regions: dict[str, list[int]] = {}
        first = 0
        for name, tokens in sizes.items():
            n = model.blocks_for(tokens)
            self.regions[name] = list(range(first, first + n))
            first += n
        self.pool = model.new_pool(first)
        layout = PoolLayout.of_pool(self.pool, model.tpb)
        layout.blocks_per_chunk(args.chunk_size)
        self.space = KeySpace("bench/prefill-model", layout)
        self.bpt = layout.bytes_per_token
        self._queues: dict[int, SaveQueue] = {}
        self.seed = args.seed * 7919 + 1

    def engine(self, tokens: int) -> CacheEngine:
        gb = tokens * self.bpt / GIB + 0.05
        return CacheEngine(
            LMCacheEngineConfig.from_defaults(chunk_size=self.args.chunk_size, max_local_cpu_size=gb)
        )

    def fresh_tokens(self, n: int) -> list[int]:
        self.seed += 1
        return random_tokens(n, self.model.dims.vocab, self.seed)

    def current(self) -> Any:
        return torch.cuda.current_stream(self.dev) if self.cuda else None

    def store_async(
        self, engine: CacheEngine, tokens: list[int], blocks: list[int], start: int, end: int
    ) -> tuple[Future[Any], SaveFence]:
        """``wait_for_save`` of the in-process adapter: the store runs on the saver thread, its side
        stream after the forward and, once the fence is released (``get_finished``), after what the
        current stream held then. The future's result is the copies' event."""
        queue = self._queues.get(id(engine))
        if queue is None:
            queue = self._queues[id(engine)] = SaveQueue(self.pool.device, "bench-save")
        fence = SaveFence(self.current(), self.dev)

        def store(stream: Any, copy_start: CopyStart) -> None:
            transfer = BlockTransfer(tokens, None, blocks, start, end)
            engine.store(self.space, 0, self.pool, transfer, stream, copy_start)

        return queue.submit(store, fence), fence


class PlainCopy:
    """A naive save: one plain pinned ``copy_`` of ``nbytes`` of the pool on a side stream after the
    forward (on CPU, a synchronous copy)."""

    def __init__(self, st: Setup, nbytes: int) -> None:
        self.st = st
        self.source = st.pool.view(-1).view(torch.uint8)[:nbytes]
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=st.cuda)
        self.stream = cudart.new_stream(st.dev) if st.cuda else None  # never one of PyTorch's pool (D64)

    def after_forward(self) -> Future[Any]:
        """Enqueue the copy after the current stream's work; the future's result is an event after it."""
        done: Future[Any] = Future()
        if self.stream is None:
            self.host.copy_(self.source)
            done.set_result(None)
            return done
        self.stream.wait_stream(self.st.current())
        with torch.cuda.stream(self.stream):
            self.host.copy_(self.source, non_blocking=True)
        done.set_result(self.stream.record_event())
        return done


PHASES = ("connector_before_ms", "forward_launch_ms", "handoff_ms", "wait_first_token_ms", "sample_ms")


class Sampler:
    """TRT-LLM's sampling: the first token (``argmax``) enqueued after the forward and copied to pinned
    host memory, an event after the copy; the host waits for that event later (at once without
    the overlap scheduler, one iteration later with it)."""

    def __init__(self, st: Setup) -> None:
        self.st = st
        self.host = [torch.empty(1, dtype=torch.long, pin_memory=st.cuda) for _ in range(2)]
        self._turn = 0

    def enqueue(self, logits: Any) -> tuple[Any, Any]:
        """The token's host buffer and the event after its copy (None on CPU: already copied)."""
        host = self.host[self._turn]
        self._turn ^= 1
        host.copy_(logits.argmax().view(1), non_blocking=self.st.cuda)
        if not self.st.cuda:
            return host, None
        return host, self.st.current().record_event(torch.cuda.Event(enable_timing=True))

    @staticmethod
    def read(sampled: tuple[Any, Any]) -> int:
        host, event = sampled
        if event is not None:
            event.synchronize()
        return int(host[0])


def launch(gated: bool, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Enqueue ``forward(*args, **kwargs)`` as TRT-LLM does with a connector (``gated``): between the
    worker's ``start_load_kv`` and ``wait_for_save``, which close and open the forward gate
    (:mod:`lmcache.forward_gate`)."""
    if not gated:
        return forward(*args, **kwargs)
    FORWARD.close()
    try:
        return forward(*args, **kwargs)
    finally:
        FORWARD.open()


@dataclass(frozen=True)
class LoopTiming:
    """One loop of prefills: wall seconds per iteration, the mean host ms per iteration of each of
    ``PHASES``, and (CUDA) medians of device ms: ``forward_device_ms`` of one forward, between events
    recorded on its stream right before and after it is enqueued (what grows there is the forward
    slowed on the device; the rest of a longer iteration is time between forwards), and
    ``token_copy_ms`` from the forward's end to its first token's arrival in host memory (a token
    copy queued behind a save's copies shows there)."""

    seconds: float
    phases: dict[str, float]
    forward_device_ms: float | None
    token_copy_ms: float | None


def prefill_loop(
    st: Setup, engine: CacheEngine | None, iterations: int, overlap: bool, plain_copy: PlainCopy | None = None
) -> LoopTiming:
    """``iterations`` new-request prefills (connector iff ``engine``; else ``plain_copy`` after each
    forward, if given), timed (see :class:`LoopTiming`), in TRT-LLM's order: lookup, forward, the
    save's hand-off (``wait_for_save``), sampling, ``get_finished`` (which releases the save's copies).

    ``overlap``: TRT-LLM's default executor loop, which waits for the previous iteration's tokens
    after this one's forward is enqueued and only then enqueues this one's sampling; without it
    (the executor's ``disable_overlap_scheduler``) each iteration samples and waits for its own."""
    model, p = st.model, st.args.prefill_tokens
    sampler = Sampler(st)
    prompts = [st.fresh_tokens(p) for _ in range(iterations)]
    saved: list[Any] = [None, None]
    unread: tuple[Any, Any] | None = None
    phases = dict.fromkeys(PHASES, 0.0)
    forwards: list[tuple[Any, Any]] = []
    tokens_copied: list[Any] = []
    sync(st.dev)
    start = time.perf_counter()
    for i, tokens in enumerate(prompts):
        blocks = st.regions["r0" if i % 2 == 0 else "r1"]
        fence: SaveFence | None = None
        t0 = time.perf_counter()
        if engine is not None:
            hit = engine.lookup(st.space, tokens, pin_id=i)
            if hit:
                raise BenchFailure(f"a unique prompt hit {hit} tokens")
            engine.release(i)
        if engine is not None or plain_copy is not None:
            previous = saved[i % 2]
            if previous is not None and previous.result() is not None:
                st.current().wait_event(previous.result())  # the region's previous save read it first
        t1 = time.perf_counter()
        if st.cuda:
            forwards.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            forwards[-1][0].record(st.current())
        logits = launch(engine is not None, model.prefill, st.pool, tokens, 0, blocks)
        if st.cuda:
            forwards[-1][1].record(st.current())
        t2 = time.perf_counter()
        if engine is not None:
            saved[i % 2], fence = st.store_async(engine, tokens, blocks, 0, p)
        elif plain_copy is not None:
            saved[i % 2] = plain_copy.after_forward()
        t3 = time.perf_counter()
        if overlap and unread is not None:
            Sampler.read(unread)
        t4 = time.perf_counter()
        sampled = sampler.enqueue(logits)
        tokens_copied.append(sampled[1])
        if not overlap:
            Sampler.read(sampled)
        unread = sampled
        if fence is not None:
            fence.release_after_current()  # ``get_finished``
        t5 = time.perf_counter()
        for name, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            phases[name] += seconds * 1e3 / iterations
    if unread is not None:
        Sampler.read(unread)
    seconds = (time.perf_counter() - start) / iterations  # not the last save's copies: no iteration waits
    sync(st.dev)
    for future in saved:
        if future is not None:
            future.result()  # the next loop starts with no store left on the saver thread
    forward_ms = token_ms = None
    if st.cuda:
        forward_ms = statistics.median(a.elapsed_time(b) for a, b in forwards)
        token_ms = statistics.median(
            end.elapsed_time(copied) for (_, end), copied in zip(forwards, tokens_copied, strict=True)
        )
    return LoopTiming(seconds, phases, forward_ms, token_ms)


def decode_loop(st: Setup, engine: CacheEngine | None) -> tuple[float, int]:
    """Seconds per decode step (connector iff ``engine``), and the chunks it stored."""
    model, c, steps, chunk = st.model, st.args.decode_context, st.args.decode_steps, st.args.chunk_size
    blocks = st.regions["decode"]
    tokens = st.fresh_tokens(c)
    logits = model.prefill(st.pool, tokens, 0, blocks)
    if engine is not None:
        future, fence = st.store_async(engine, tokens[:], blocks, 0, c)
        fence.release_after_current()
        future.result()
    token = int(logits.argmax().item())
    sync(st.dev)
    saves: list[Future[Any]] = []
    before = engine.stats.stored_chunks if engine is not None else 0
    start = time.perf_counter()
    for _ in range(steps):
        pos = len(tokens)
        tokens.append(token)
        # A new shape every step (no CUDA graph).
        logits = launch(engine is not None, model.prefill, st.pool, [token], pos, blocks, graph=False)
        fence = None
        if engine is not None and (pos + 1) % chunk == 0:
            future, fence = st.store_async(engine, tokens[:], blocks, pos + 1 - chunk, pos + 1)
            saves.append(future)
        token = int(logits.argmax().item())
        if fence is not None:
            fence.release_after_current()  # ``get_finished``, after sampling
    sync(st.dev)
    seconds = (time.perf_counter() - start) / steps
    for future in saves:
        future.result()
    return seconds, (engine.stats.stored_chunks - before if engine is not None else 0)


def connector_iteration(st: Setup) -> dict[str, Any]:
    args = st.args
    engine = st.engine(4 * args.prefill_tokens)
    plain_copy = PlainCopy(st, args.prefill_tokens * st.bpt)
    out: dict[str, Any] = {}
    for name, overlap in (("prefill", True), ("prefill_no_overlap", False)):
        stored = engine.stats.stored_chunks
        prefill_loop(st, None, 2, overlap)  # warm-up: kernels (CUDA graph capture), L1's first slabs
        prefill_loop(st, engine, 2, overlap)
        prefill_loop(st, None, 2, overlap, plain_copy)
        base: list[LoopTiming] = []
        conn: list[LoopTiming] = []
        copied: list[LoopTiming] = []
        for _ in range(args.repeats):
            base.append(prefill_loop(st, None, args.iterations, overlap))
            conn.append(prefill_loop(st, engine, args.iterations, overlap))
            copied.append(prefill_loop(st, None, args.iterations, overlap, plain_copy))
        if engine.stats.hit_tokens:
            raise BenchFailure("0 % hit scenario had hits")
        stored = engine.stats.stored_chunks - stored
        if stored == 0:
            raise BenchFailure("the connector stored nothing")
        b, c, naive = (statistics.median(t.seconds for t in runs) for runs in (base, conn, copied))
        out[name] = {
            "tokens": args.prefill_tokens,
            "iterations": args.iterations,
            "overlap_scheduler": overlap,
            "no_connector_ms": b * 1e3,
            "connector_ms": c * 1e3,
            "ratio": c / b,
            "plain_copy_ms": naive * 1e3,
            "plain_copy_ratio": naive / b,
            "stored_chunks": stored,
            "l1_evictions": engine.l1.evictions,
            "phases_no_connector": {k: statistics.median(t.phases[k] for t in base) for k in PHASES},
            "phases_connector": {k: statistics.median(t.phases[k] for t in conn) for k in PHASES},
        }
        if st.cuda:
            variants = (("no_connector", base), ("connector", conn), ("plain_copy", copied))
            for field in ("forward_device_ms", "token_copy_ms"):
                out[name][field] = {
                    label: statistics.median(getattr(t, field) for t in runs) for label, runs in variants
                }
    dengine = st.engine(args.decode_context + args.decode_steps + 2 * args.chunk_size)
    decode_base: list[float] = []
    decode_conn: list[float] = []
    stored = 0
    for r in range(args.repeats + 1):
        dengine.clear()
        sync(st.dev)
        tb, _ = decode_loop(st, None)
        tc, n = decode_loop(st, dengine)
        if r:  # the first round is a warm-up
            decode_base.append(tb)
            decode_conn.append(tc)
            stored = n
    expected = (
        args.decode_context + args.decode_steps
    ) // args.chunk_size - args.decode_context // args.chunk_size
    if stored != expected:
        raise BenchFailure(f"decode stored {stored} chunks, expected {expected}")
    b, c = statistics.median(decode_base), statistics.median(decode_conn)
    out["decode"] = {
        "context": args.decode_context,
        "steps": args.decode_steps,
        "no_connector_ms": b * 1e3,
        "connector_ms": c * 1e3,
        "ratio": c / b,
        "chunks_stored_per_loop": stored,
    }
    return out


def saves_in_flight(st: Setup) -> dict[str, Any]:
    args, model = st.args, st.model
    s = args.save_tokens
    engine = st.engine(s + args.chunk_size)
    save_blocks = st.regions["save"]
    # The prefix to save: any bytes will do (the cost of a copy does not depend on the values).
    st.pool[save_blocks] = torch.randn(st.pool[save_blocks].shape, device=st.dev).to(st.pool.dtype)
    ptokens = st.fresh_tokens(args.prefill_tokens)
    dblocks = st.regions["decode"]
    dtokens = st.fresh_tokens(args.decode_context + 1)
    model.prefill(st.pool, dtokens[:-1], 0, dblocks)
    forwards = {  # each with the steps timed in a row
        "prefill": (lambda: model.prefill(st.pool, ptokens, 0, st.regions["r0"]), 1),
        "decode": (
            lambda: model.prefill(st.pool, dtokens[-1:], args.decode_context, dblocks),
            args.decode_steps_in_flight,
        ),
    }
    out: dict[str, Any] = {"save_tokens": s, "save_bytes": s // args.chunk_size * args.chunk_size * st.bpt}

    def timed_forward(forward: Callable[[], Any], steps: int, gated: bool) -> tuple[float, float]:
        """Seconds per step of ``steps`` forwards launched one after the other (each as an executor
        iteration launches it), and of their launch alone (the host's part, where a saver thread
        holding the GIL shows first; see benchmarks/RESULTS.md, D37)."""
        t0 = time.perf_counter()
        for _ in range(steps):
            launch(gated, forward)
        launched = time.perf_counter() - t0
        if st.cuda:
            st.current().synchronize()
        return (time.perf_counter() - t0) / steps, launched / steps

    def with_save(
        forward: Callable[[], Any], steps: int, blocks: list[int], host_done: bool
    ) -> tuple[tuple[float, float], float, int]:
        """Forward and launch seconds with a save just handed off (``host_done``: after the saver
        thread's host work, so only the device-side overlap remains); hand-off seconds; save still
        running."""
        engine.clear()
        sync(st.dev)
        tokens = st.fresh_tokens(s)
        e0 = time.perf_counter()
        done, fence = st.store_async(engine, tokens, blocks, 0, s)
        fence.release_after_current()  # the save is to overlap the forward launched next
        handoff = time.perf_counter() - e0
        if host_done:
            done.result()
        seconds = timed_forward(forward, steps, gated=True)
        event = done.result()
        still = event is not None and not event.query()
        sync(st.dev)
        if engine.stats.stored_chunks == 0:
            raise BenchFailure("the save stored nothing")
        return seconds, handoff, still

    for fname, (forward, steps) in forwards.items():
        for layout_name, blocks in (("adjacent", save_blocks), ("scattered", save_blocks[::-1])):
            base, loaded, settled, enqueue, running, running_settled = [], [], [], [], 0, 0
            launch_base, launch_loaded = [], []
            for r in range(args.repeats + 1):
                engine.clear()
                sync(st.dev)
                t_base, l_base = timed_forward(forward, steps, gated=False)
                (t_loaded, l_loaded), handoff, still = with_save(forward, steps, blocks, host_done=False)
                (t_settled, _), _, still_settled = with_save(forward, steps, blocks, host_done=True)
                if r:
                    base.append(t_base)
                    loaded.append(t_loaded)
                    settled.append(t_settled)
                    launch_base.append(l_base)
                    launch_loaded.append(l_loaded)
                    enqueue.append(handoff)
                    running += still
                    running_settled += still_settled
            b, w, h = statistics.median(base), statistics.median(loaded), statistics.median(settled)
            out[f"{fname}_{layout_name}"] = {
                "forward": fname,
                "forward_tokens": args.prefill_tokens if fname == "prefill" else 1,
                "steps": steps,
                "no_saves_ms": b * 1e3,
                "with_saves_ms": w * 1e3,
                "ratio": w / b,
                "with_saves_host_done_ms": h * 1e3,
                "ratio_host_done": h / b,
                "launch_no_saves_ms": statistics.median(launch_base) * 1e3,
                "launch_with_saves_ms": statistics.median(launch_loaded) * 1e3,
                "store_enqueue_ms": statistics.median(enqueue) * 1e3,
                "saves_still_running": running / args.repeats,
                "saves_still_running_host_done": running_settled / args.repeats,
            }
    if not st.cuda:
        out["note"] = "CPU: stores are synchronous copies, nothing is in flight; the ratios mean nothing here"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--prefill-tokens", type=int, default=None, help="default 4096 (--small: 256)")
    parser.add_argument(
        "--iterations", type=int, default=None, help="prefills per loop (default 16; --small 4)"
    )
    parser.add_argument("--decode-context", type=int, default=None, help="default 4096 (--small: 128)")
    parser.add_argument("--decode-steps", type=int, default=None, help="default 256 (--small: 64)")
    parser.add_argument("--save-tokens", type=int, default=None, help="default 32768 (--small: 1024)")
    parser.add_argument(
        "--decode-steps-in-flight",
        type=int,
        default=None,
        help="(b): decode steps timed in a row with the save in flight (default 4: a 32k save's copies "
        "take about four 4k-context steps; --small: 2)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--parts", nargs="+", choices=("a", "b"), default=["a", "b"], help="which measurements (default both)"
    )
    args = parser.parse_args()
    defaults = {
        "prefill_tokens": (4096, 256),
        "iterations": (16, 4),
        "decode_context": (4096, 128),
        "decode_steps": (256, 64),
        "save_tokens": (32768, 1024),
        "decode_steps_in_flight": (4, 2),
    }
    for key, (big, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if args.small else big)
    model = build_model(args)
    st = Setup(model, args)
    results = describe(model, args)
    results["repeats"] = args.repeats
    try:
        if "a" in args.parts:
            results["connector_iteration"] = connector_iteration(st)
        if "b" in args.parts:
            results["saves_in_flight"] = saves_in_flight(st)
    except BenchFailure as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print(f"card: {results['card']}  model: {model.dims.name} {results['dtype']}  chunk {args.chunk_size}")
    if "a" in args.parts:
        print("(a) iteration time at 0 % hits, in-process connector vs none")
    for name, r in results.get("connector_iteration", {}).items():
        ms = f"{r['no_connector_ms']:9.3f} ms -> {r['connector_ms']:9.3f} ms"
        naive = f"   a plain copy instead {r['plain_copy_ratio']:.3f}" if "plain_copy_ratio" in r else ""
        print(f"  {name:<18} {ms}   ratio {r['ratio']:.3f}{naive}")
        for phase in PHASES if "phases_connector" in r else ():
            before, after = r["phases_no_connector"][phase], r["phases_connector"][phase]
            print(f"      {phase:<22} {before:8.3f} ms -> {after:8.3f} ms")
        if "forward_device_ms" in r:
            device = r["forward_device_ms"]
            change = f"{device['no_connector']:8.3f} ms -> {device['connector']:8.3f} ms"
            print(f"      forward on the device  {change} (plain copy: {device['plain_copy']:.3f} ms)")
            token = r["token_copy_ms"]
            change = f"{token['no_connector']:8.3f} ms -> {token['connector']:8.3f} ms"
            print(f"      token after forward    {change} (plain copy: {token['plain_copy']:.3f} ms)")
    if "b" in args.parts:
        print(
            f"(b) forward time while a {args.save_tokens}-token save is in flight vs nothing in flight "
            f"(ms per step; decode: {args.decode_steps_in_flight} steps in a row)"
        )
    for name, r in results.get("saves_in_flight", {}).items():
        if isinstance(r, dict):
            ms = f"{r['no_saves_ms']:9.3f} ms -> {r['with_saves_ms']:9.3f} ms"
            print(
                f"  {name:<18} {ms}   ratio {r['ratio']:.3f}   hand-off {r['store_enqueue_ms']:.2f} ms "
                f"on the executor thread, launch {r['launch_no_saves_ms']:.2f} -> "
                f"{r['launch_with_saves_ms']:.2f} ms, still running {r['saves_still_running']:.0%}; "
                f"after the saver's host work: ratio {r['ratio_host_done']:.3f}, still running "
                f"{r['saves_still_running_host_done']:.0%}"
            )
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
