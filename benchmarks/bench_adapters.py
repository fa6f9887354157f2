"""What TRT-LLM sees: saves, loads and lookups through a preset's adapters, while L1 fills and once full.

The scheduler and worker of ``lmcache`` (in-process) or ``lmcache-mp`` (a server started here) are
driven as TRT-LLM's executor drives them, with a pool of a model's KV shape and requests of
``--tokens`` fresh tokens whose pages are scattered:

* lookup: host time inside ``get_num_new_matched_tokens`` for a miss and for a hit (p50);
* save: from ``wait_for_save`` to the request's id coming back from ``get_finished``; with ``--forward-ms``
  the forward is still running on the device when ``wait_for_save`` is called, as in TRT-LLM, and a save is
  timed from the forward's end (the save's host work may overlap the forward; its copies may not);
* load: from ``start_load_kv`` until the stream it was given has run the copies (with ``--layer-hooks`` the
  forward's per-layer hooks are called as TRT-LLM calls them, so loads go layer-wise, and ``wait_for_save``
  ends the forward before the stream is waited for); and the host time ``start_load_kv`` itself takes (p50),
  which the executor spends before it enqueues the forward;
* with ``--mixed``, a save beside a load: a forward saves a fresh prompt and the next loads one saved before
  while that save is in flight (TRT-LLM's iterations overlap them so), timed from the first ``wait_for_save``
  until both landed, against two plain pinned copies in opposite directions at once (with the load's
  ``start_load_kv`` host time beside it: while it runs the save waits, D41);
* with ``--overlap-scheduler`` (and ``--forward-ms``), the previous iteration's forward runs before each
  saving one and the host waits for it between ``wait_for_save`` and ``get_finished``, as TRT-LLM's default
  executor loop waits for the previous tokens: the save's host work can run then, its copies only after the
  saving forward and the release at ``get_finished`` (D67).

Saves are reported in two phases: while L1 fills for the first time (every save also takes new host memory)
and once L1 is full and evicting. By default saves follow each other at once, faster than a model's prefill
produces KV; ``--prefill-ms`` spaces them as the prefill would (the host idles), and ``--warmup-s`` puts
TRT-LLM's model warm-up between the worker's construction and its ``register_kv_caches`` (timed:
``register_ms``; by default the first save follows construction at once). Each figure is a ratio to a plain
pinned ``copy_`` of the same bytes in the same run (device to host for saves, host to device for loads). CPU
runs (``--device cpu``, tiny sizes) only exercise the path.

    python benchmarks/bench_adapters.py --preset lmcache --l1-size-gb 16 --out adapters.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmcache.config import LMCacheEngineConfig  # noqa: E402
from lmcache.integration.tensorrt_llm._trtllm import RequestData, SchedulerOutput  # noqa: E402
from lmcache.integration.tensorrt_llm.server_backend import process_connection  # noqa: E402
from lmcache.server.client import wait_for_server  # noqa: E402
from lmcache.testing.trtllm_replay import KvCacheConfig, KvCacheConnectorConfig, TorchLlmArgs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_load import Forward  # noqa: E402
from kv_shapes import CHUNK, KV_SHAPES  # noqa: E402
from mp_transfer import server_gc, server_l1_memory  # noqa: E402

SHAPES = {**KV_SHAPES, "tiny": (2, 2, 16)}
POLL_S = 0.0001
TRTLLM_GC_GEN0_THRESHOLD = 20000  # PyExecutor's loop: garbage_collection_gen0_threshold (Python's: 700)


@dataclass
class Request:
    """The members of TRT-LLM's request that the scheduler reads."""

    request_id: int
    tokens: list[int]
    cache_salt: str | None = None
    fresh_lists: bool = False
    """``get_tokens`` builds a new list per call, as TRT-LLM's binding does (else hands out its own)."""

    @property
    def prompt_len(self) -> int:
        return len(self.tokens)

    def get_tokens(self, beam: int) -> list[int]:
        return list(self.tokens) if self.fresh_lists else self.tokens


def timed(fn: Any) -> tuple[Any, float]:
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began


def _median_s(run: Any, cuda: bool, repeats: int) -> float:
    """Median seconds of ``run()`` with its device work (synchronized before and after)."""
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def pinned_both_ways_s(pool: torch.Tensor, out_rows: int, in_rows: int, repeats: int = 5) -> float:
    """Median time of two plain pinned copies at once on two streams, ``out_rows`` pool rows to the
    host and ``in_rows`` other rows from it (the bidirectional ceiling)."""
    out_src, in_dst = pool[:out_rows], pool[out_rows : out_rows + in_rows]
    out_host = torch.empty(out_src.shape, dtype=pool.dtype, pin_memory=pool.is_cuda)
    in_host = torch.empty(in_dst.shape, dtype=pool.dtype, pin_memory=pool.is_cuda)
    streams = [torch.cuda.Stream(pool.device), torch.cuda.Stream(pool.device)] if pool.is_cuda else []

    def both() -> None:
        if not streams:
            out_host.copy_(out_src)
            in_dst.copy_(in_host)
            return
        with torch.cuda.stream(streams[0]):
            out_host.copy_(out_src, non_blocking=True)
        with torch.cuda.stream(streams[1]):
            in_dst.copy_(in_host, non_blocking=True)

    return _median_s(both, pool.is_cuda, repeats)


def pinned_copy_s(pool: torch.Tensor, rows: int, to_host: bool, repeats: int = 5) -> float:
    """Median time of one plain pinned ``copy_`` of ``rows`` pool rows (the ceiling)."""
    src = pool[:rows]
    host = torch.empty(src.shape, dtype=src.dtype, pin_memory=pool.is_cuda)

    def copy() -> None:
        if to_host:
            host.copy_(src, non_blocking=True)
        else:
            src.copy_(host, non_blocking=True)

    return _median_s(copy, pool.is_cuda, repeats)


@dataclass
class Loaded:
    """One load through the adapters: its lookup and load seconds, whether it was a full hit, the
    pages its rows went to (in block order), and the seconds ``start_load_kv`` took on the host."""

    lookup_s: float
    load_s: float
    full_hit: bool
    pages: list[int]
    host_s: float = 0.0


class AdapterRig:
    """One preset's scheduler and worker over one pool, driven like TRT-LLM's executor."""

    def __init__(self, args: argparse.Namespace, server_url: str | None, load_regions: int = 1) -> None:
        """``load_regions``: pool regions loads can go to (:meth:`load_into`), besides the one saves
        read from."""
        layers, heads, head_dim = SHAPES[args.model]
        self.tpb = args.tokens_per_block
        self.tokens = args.tokens // CHUNK * CHUNK
        self.blocks = self.tokens // self.tpb
        device = torch.device(args.device)
        self.pool = torch.randn(
            (1 + load_regions) * self.blocks + 8, layers, 2, heads * self.tpb * head_dim, device=device
        ).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        llm_args = TorchLlmArgs(
            model=f"bench/{args.model}",
            kv_cache_config=KvCacheConfig(
                tokens_per_block=self.tpb, max_tokens=self.pool.shape[0] * self.tpb
            ),
            kv_connector_config=KvCacheConnectorConfig(connector=args.preset, server_url=server_url),
        )
        if args.preset == "lmcache":
            from lmcache.integration.tensorrt_llm import tensorrt_adapter as module
        else:
            from lmcache.integration.tensorrt_llm import tensorrt_mp_adapter as module  # type: ignore[no-redef]
        names = ("LMCacheKvConnectorScheduler", "LMCacheKvConnectorWorker")
        if args.preset == "lmcache-mp":
            names = ("LMCacheMPKvConnectorScheduler", "LMCacheMPKvConnectorWorker")
        self.worker = getattr(module, names[1])(llm_args)
        # TRT-LLM builds the connector before its model warm-up and registers the pool after it.
        time.sleep(getattr(args, "warmup_s", 0.0))
        # Through the server, registration returns once the server's L1 is mapped (D105).
        self.register_s = timed(lambda: self.worker.register_kv_caches(self.pool))[1]
        self.scheduler = getattr(module, names[0])(llm_args)
        self.server_url = server_url
        self.layers = layers if getattr(args, "layer_hooks", False) else 0
        forward_ms = getattr(args, "forward_ms", 0.0)
        self.forward = Forward(device, forward_ms) if forward_ms > 0 else None
        self.overlap = getattr(args, "overlap_scheduler", False) and self.forward is not None
        self.next_id = 1
        self.fresh_token_lists = getattr(args, "fresh_token_lists", False)
        self.generator = torch.Generator().manual_seed(args.seed)
        self._in_flight: set[int] = set()
        """Saves :meth:`hand_over_save` handed over, not yet waited for."""
        self._landed: set[int] = set()
        """Of those, the ones ``get_finished`` reported."""
        if args.gc_gen0_threshold > 0:  # as TRT-LLM's executor loop runs (PyExecutor)
            gc.set_threshold(args.gc_gen0_threshold, *gc.get_threshold()[1:])

    def settle(self, timeout_s: float = 300.0) -> None:
        """Wait until this process has mapped (and page-locked) the server's L1 slabs its shared-L1
        registration announced: saves after that never wait for page-locking (steady state)."""
        if self.server_url is None:
            return
        config = LMCacheEngineConfig.from_env()
        if not process_connection(self.server_url, config).client.registrations.wait_slabs_mapped(timeout_s):
            raise RuntimeError(f"the server's L1 slabs were not mapped within {timeout_s} s")

    def _pages(self, region: int) -> list[int]:
        """A region's pages, shuffled (TRT-LLM's pages are scattered); region 0 is what saves read."""
        order = torch.randperm(self.blocks, generator=self.generator) + region * self.blocks
        return order.tolist()

    def _iteration(self, request: Request, pages: list[int], computed: int, scheduled: int) -> None:
        data = RequestData(
            request_id=request.request_id,
            new_tokens=list(request.tokens),
            new_block_ids=pages,
            computed_position=computed,
        )
        data.num_scheduled_tokens = scheduled
        meta = self.scheduler.build_connector_meta(SchedulerOutput(new_requests=[data]))
        self.worker.bind_connector_meta(meta)

    def _layer_hooks(self) -> None:
        """The forward's per-layer hooks, as TRT-LLM calls them on an eager forward (``--layer-hooks``):
        after one forward has called them all, the connector's loads go layer-wise."""
        for layer in range(self.layers):
            self.worker.wait_for_layer_load(layer, self.stream)

    def lookup(self, tokens: list[int]) -> tuple[Request, int, float]:
        request = Request(self.next_id, tokens, fresh_lists=self.fresh_token_lists)
        self.next_id += 1
        (matched, _), seconds = timed(lambda: self.scheduler.get_num_new_matched_tokens(request, 0))
        return request, matched, seconds

    def save(self, tokens: list[int]) -> tuple[float, float, list[int]]:
        """A prefill of ``tokens`` whose chunks are saved; (lookup s, save s, the pages saved from:
        what a load of ``tokens`` must bring back, for :meth:`load`'s ``source``)."""
        request, _, lookup_s = self.lookup(tokens)
        pages = self._pages(0)
        since_forward = self._saving_forward(request, pages)
        self._wait_saved(request.request_id)
        return lookup_s, since_forward(), pages

    def hand_over_save(self, tokens: list[int]) -> list[int]:
        """A prefill of ``tokens`` whose save is handed over, then left running as TRT-LLM's executor
        leaves it (the next iteration does not wait for it); its id reaches ``get_finished`` at once.
        Returns the pages saved from; :meth:`wait_handed_over` waits for every such save."""
        request, _, _ = self.lookup(tokens)
        pages = self._pages(0)
        self._saving_forward(request, pages)
        self._in_flight.add(request.request_id)
        self._landed.update(self.worker.get_finished([request.request_id], [])[0])
        return pages

    def wait_handed_over(self) -> None:
        """Poll ``get_finished`` until every save :meth:`hand_over_save` handed over has landed."""
        while not self._in_flight <= self._landed:
            time.sleep(POLL_S)  # not spinning: the saver threads need the GIL
            self._landed.update(self.worker.get_finished([], [])[0])
        self._landed -= self._in_flight
        self._in_flight.clear()

    def _after_wait_for_save(self, previous: Callable[[], float]) -> None:
        """What TRT-LLM's executor does between ``wait_for_save`` and ``get_finished`` with the overlap
        scheduler (``--overlap-scheduler``): it waits for the previous iteration's tokens (the end of
        the forward enqueued before the saving one), then ends the iteration with ``get_finished``."""
        previous()
        self.worker.get_finished([], [])

    def _saving_forward(self, request: Request, pages: list[int]) -> Callable[[], float]:
        """The forward of a fresh prompt, its save handed to the connector; returns what tells the
        seconds since the forward ended (without ``--forward-ms``: since ``wait_for_save`` was called).
        With ``--overlap-scheduler`` the previous iteration's forward runs first, and the executor
        waits for it after ``wait_for_save`` (:meth:`_after_wait_for_save`)."""
        self.scheduler.update_state_after_alloc(request, pages)
        self._iteration(request, pages, 0, len(request.tokens))
        self.worker.start_load_kv(self.stream)
        self._layer_hooks()
        if self.stream is not None:
            self.stream.synchronize()  # the forwards start on an idle stream: their end is began + their time
        began = time.perf_counter()
        previous_s = self.forward.enqueue() if self.forward is not None and self.overlap else lambda: 0.0
        forward_s = self.forward.enqueue() if self.forward is not None else lambda: 0.0
        self.worker.wait_for_save(self.stream)
        if not self.scheduler.request_finished(request, pages):
            raise RuntimeError("the connector planned no save for a fresh prompt")
        if self.overlap:
            self._after_wait_for_save(previous_s)
        return lambda: time.perf_counter() - began - previous_s() - forward_s()

    def _wait_saved(self, request_id: int) -> None:
        """Poll ``get_finished`` until the finished request's save is reported."""
        asked = [request_id]
        while True:
            saved, _ = self.worker.get_finished(asked, [])
            asked = []
            if request_id in saved:
                return
            # Polled as an executor loop would, not spinning: a spin would hold the GIL from the
            # saver thread (up to the interpreter's switch interval per hand-over).
            time.sleep(POLL_S)

    def save_beside_load(self, fresh: list[int], held: list[int], source: list[int]) -> tuple[Loaded, bool]:
        """A forward that saves ``fresh`` (a new prompt), then the next, which loads ``held`` (saved
        from the pages ``source``) while that save is in flight: the load, its ``load_s`` the seconds from
        the first ``wait_for_save`` (with ``--forward-ms``, from its forward's end) until both landed, and
        whether it brought the saved rows back in full.
        Both are looked up first, as the overlap scheduler does during the forward before."""
        load_request, matched, _ = self.lookup(held)
        save_request, _, _ = self.lookup(fresh)
        load_pages = self._pages(1)
        since_forward = self._saving_forward(save_request, self._pages(0))
        if not self.overlap:  # else done after the wait for the previous tokens
            self.worker.get_finished([], [])  # the executor's loop ends each iteration with it
        self.scheduler.update_state_after_alloc(load_request, load_pages)
        self._iteration(load_request, load_pages, 0, len(held) - matched)
        enqueue = time.perf_counter()
        self.worker.start_load_kv(self.stream)
        host_s = time.perf_counter() - enqueue
        self._layer_hooks()
        self.worker.wait_for_save(self.stream)
        if self.stream is not None:
            self.stream.synchronize()
        self._wait_saved(save_request.request_id)
        seconds = since_forward()
        self.scheduler.request_finished(load_request, load_pages)
        full_hit = matched == len(held) - self.tpb
        loaded = Loaded(0.0, seconds, full_hit, load_pages[: matched // self.tpb], host_s)
        return loaded, loaded.full_hit and self.rows_equal(loaded, source)

    def load(self, tokens: list[int], source: list[int] | None = None) -> tuple[Loaded, bool]:
        """A hit on ``tokens``: the load, and whether it was a full hit and, given ``source``, the
        loaded rows equal ``source``'s."""
        loaded = self.load_into(tokens, 1)
        equal = source is None or self.rows_equal(loaded, source)
        return loaded, equal and loaded.full_hit

    def load_into(self, tokens: list[int], region: int) -> Loaded:
        """A hit on ``tokens`` loaded into ``region``'s pages (checked later by :meth:`rows_equal`)."""
        request, matched, lookup_s = self.lookup(tokens)
        pages = self._pages(region)
        self.scheduler.update_state_after_alloc(request, pages)
        self._iteration(request, pages, 0, len(tokens) - matched)
        began = time.perf_counter()
        self.worker.start_load_kv(self.stream)
        host_s = time.perf_counter() - began
        if self.layers:
            self._layer_hooks()
            self.worker.wait_for_save(self.stream)  # orders the stream after the whole load
        if self.stream is not None:
            self.stream.synchronize()
        load_s = time.perf_counter() - began
        self.scheduler.request_finished(request, pages)
        full_hit = matched == len(tokens) - self.tpb
        return Loaded(lookup_s, load_s, full_hit, pages[: matched // self.tpb], host_s)

    def rows_equal(self, loaded: Loaded, source: list[int]) -> bool:
        """Whether the rows ``loaded`` holds equal those of the pages its prompt was saved from."""
        rows = len(loaded.pages)
        return torch.equal(self.pool[loaded.pages], self.pool[source[:rows]])


def start_server(args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    url = f"ipc://{workdir / 's.sock'}"
    with socket.socket() as probe:  # a free TCP port for the server's other listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    server = subprocess.Popen(
        [
            sys.executable, "-m", "lmcache.v1.multiprocess.server", "--port", str(port),
            "--ipc-path", str(workdir / "s.sock"), "--l1-size-gb", str(args.l1_size_gb),
            "--chunk-size", str(CHUNK),
        ],
        stdout=open(workdir / "server.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        env=env,
    )  # fmt: skip
    wait_for_server(url, 120)
    return server, url


def _p50_ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1e3, 3)


def summary(values: list[float], ceiling: float) -> dict[str, Any]:
    """Ratios to the ceiling: the median and the worst run; and every run's ms, in order (which
    one was the worst: the first, or one in the middle)."""
    return {
        "median_ratio": round(ceiling / statistics.median(values), 3),
        "worst_ratio": round(ceiling / max(values), 3),
        "median_ms": round(statistics.median(values) * 1e3, 3),
        "runs": len(values),
        "runs_ms": [round(v * 1e3, 2) for v in values],
    }


def start_cache(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes] | None, str | None]:
    """The engine's ``LMCACHE_*`` settings, and for ``lmcache-mp`` a server (process, URL)."""
    os.environ.update(
        LMCACHE_CHUNK_SIZE=str(CHUNK),
        LMCACHE_LOCAL_CPU="True",
        LMCACHE_MAX_LOCAL_CPU_SIZE=str(args.l1_size_gb),
    )
    if args.preset != "lmcache-mp":
        return None, None
    return start_server(args, Path(tempfile.mkdtemp(prefix="lmc-bench-", dir="/tmp")))


def run(args: argparse.Namespace) -> dict[str, Any]:
    server, url = start_cache(args)
    try:
        rig = AdapterRig(args, url)
        request_bytes = rig.blocks * rig.pool[0].numel() * rig.pool.element_size()
        capacity = int(args.l1_size_gb * (1 << 30))
        fill = capacity // request_bytes
        # The loads read the last saves back (the mixed phase's, after as many saves more): all must
        # still be in L1.
        held = (2 if args.mixed else 1) * args.repeats + 2
        if fill < held:
            raise SystemExit(
                f"--l1-size-gb {args.l1_size_gb} holds {fill} requests of {request_bytes / 2**20:.1f} MiB, "
                f"too few for --repeats {args.repeats} loads of whole requests{' and --mixed' * args.mixed}: "
                f"raise --l1-size-gb to at least {held * request_bytes / 2**30:.3g} or lower --repeats"
            )
        vocab = 150_000
        cold, warm, miss_lookups, prompts = [], [], [], []
        for i in range(fill + args.repeats):
            tokens = torch.randint(0, vocab, (rig.tokens,), generator=rig.generator).tolist()
            time.sleep(args.prefill_ms / 1e3)  # the prompt's prefill computing (untimed)
            lookup_s, save_s, pages = rig.save(tokens)
            (cold if i < fill else warm).append(save_s)
            miss_lookups.append(lookup_s)
            prompts.append((tokens, pages))
        loads: list[Loaded] = []
        equal = True
        for tokens, pages in prompts[-args.repeats :]:
            loaded, same = rig.load(tokens, pages)
            loads.append(loaded)
            equal = equal and same
        mixed: list[Loaded] = []
        for tokens, pages in prompts[-args.repeats :] if args.mixed else []:
            fresh = torch.randint(0, vocab, (rig.tokens,), generator=rig.generator).tolist()
            loaded, same = rig.save_beside_load(fresh, tokens, pages)
            mixed.append(loaded)
            equal = equal and same
        # The ceilings last: while L1 is pinned in the background from start-up, page-locking holds
        # the driver's lock and the memory bus, and a plain copy measured then would be slowed too.
        save_ceiling = pinned_copy_s(rig.pool, rig.blocks, to_host=True)
        load_ceiling = pinned_copy_s(rig.pool, rig.blocks - 1, to_host=False)
        both_ceiling = pinned_both_ways_s(rig.pool, rig.blocks, rig.blocks - 1) if mixed else 0.0
        both_bytes = (2 * rig.blocks - 1) * request_bytes // rig.blocks
        return {
            "preset": args.preset,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "model_kv": args.model,
            "tokens": rig.tokens,
            "layer_hooks": bool(rig.layers),
            "bytes_per_request": request_bytes,
            "l1_bytes": capacity,
            "prefill_ms": args.prefill_ms,
            "warmup_s": args.warmup_s,
            "forward_ms": args.forward_ms,
            "forward_device_p50_ms": _p50_ms(rig.forward.device_s) if rig.forward else None,
            "overlap_scheduler": args.overlap_scheduler,
            "register_ms": round(rig.register_s * 1e3, 1),
            "save_while_l1_fills": summary(cold[: args.repeats] or cold, save_ceiling) if cold else None,
            "save_l1_full": summary(warm, save_ceiling),
            "load_l1_full": summary([loaded.load_s for loaded in loads], load_ceiling),
            "load_host_p50_ms": _p50_ms([loaded.host_s for loaded in loads]),
            "load_host_runs_ms": [round(loaded.host_s * 1e3, 2) for loaded in loads],
            "save_beside_load": summary([loaded.load_s for loaded in mixed], both_ceiling) if mixed else None,
            "save_beside_load_host_p50_ms": _p50_ms([loaded.host_s for loaded in mixed]) if mixed else None,
            "bidirectional_gbps": round(both_bytes / both_ceiling / 1e9, 1) if mixed else None,
            "lookup_miss_p50_us": round(statistics.median(miss_lookups) * 1e6, 1),
            "lookup_hit_p50_us": round(statistics.median([loaded.lookup_s for loaded in loads]) * 1e6, 1),
            "loaded_rows_equal": equal,
            "gc_gen0_threshold": args.gc_gen0_threshold,
            "server_gc": server_gc(url) if server is not None else None,
            "server_l1_memory": server_l1_memory(url) if url is not None else None,
        }
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)


def rig_parser(doc: str | None, l1_size_gb: float) -> argparse.ArgumentParser:
    """The options of an :class:`AdapterRig` benchmark (the server's too, for ``lmcache-mp``)."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=doc, formatter_class=raw, allow_abbrev=False)
    parser.add_argument("--preset", choices=("lmcache", "lmcache-mp"), default="lmcache")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(SHAPES), default="qwen2-1.5b")
    parser.add_argument("--tokens-per-block", type=int, default=32)
    parser.add_argument("--l1-size-gb", type=float, default=l1_size_gb)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--layer-hooks",
        action="store_true",
        help="call the per-layer hooks in every forward, as TRT-LLM's eager forwards do: loads go layer-wise",
    )
    parser.add_argument(
        "--gc-gen0-threshold",
        type=int,
        default=TRTLLM_GC_GEN0_THRESHOLD,
        help="the garbage collector's generation-0 threshold while the adapters run, as TRT-LLM's executor "
        f"loop sets it (its garbage_collection_gen0_threshold, default {TRTLLM_GC_GEN0_THRESHOLD}); 0: "
        "Python's own (700): many more, shorter collections",
    )
    parser.add_argument(
        "--fresh-token-lists",
        action="store_true",
        help="get_tokens builds a new list per call, as TRT-LLM's binding does (its copy is timed too); "
        "by default the rig hands out the list it keeps",
    )
    parser.add_argument("--out", help="write the JSON here too")
    return parser


def report(results: dict[str, Any], out: str | None) -> None:
    """Print ``results`` as JSON, and write them to ``out`` if given."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def run_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options of :func:`run`: the rig's, and the run's."""
    parser = rig_parser(doc, l1_size_gb=16.0)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per request")
    parser.add_argument("--repeats", type=int, default=10, help="saves and loads timed once L1 is full")
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="also time a save beside a load (a save in flight, the next load)",
    )
    parser.add_argument(
        "--prefill-ms",
        type=float,
        default=0.0,
        help="idle time before each save's forward, as the prompt's prefill would compute (a 16k prompt "
        "of Qwen2-1.5B: about 155 ms on an H200, RESULTS T6); 0: saves back to back, faster than any "
        "prefill produces KV",
    )
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=0.0,
        help="time between the worker's construction and its register_kv_caches, as TRT-LLM's model "
        "warm-up (CUDA graph capture) takes; 0: the first save follows construction at once",
    )
    parser.add_argument(
        "--forward-ms",
        type=float,
        default=0.0,
        help="device time of each saving forward, still running when wait_for_save is called (as in "
        "TRT-LLM); saves are then timed from its end; 0: no forward, saves timed from wait_for_save",
    )
    parser.add_argument(
        "--overlap-scheduler",
        action="store_true",
        help="with --forward-ms: the previous iteration's forward runs before each saving one, and the "
        "host waits for it between wait_for_save and get_finished, as TRT-LLM's default executor loop "
        "waits for the previous tokens (the save's host work can run meanwhile)",
    )
    return parser


def parse_run_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line's options for :func:`run` (a parser from :func:`run_parser`), checked."""
    args = parser.parse_args()
    if args.overlap_scheduler and args.forward_ms <= 0:
        parser.error("--overlap-scheduler needs --forward-ms above 0 (the forward the host waits for)")
    return args


def main() -> int:
    args = parse_run_args(run_parser(__doc__))
    results = run(args)
    report(results, args.out)
    return 0 if results["loaded_rows_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
