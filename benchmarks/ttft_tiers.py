"""The tiers ``bench_ttft.py`` times a hit from: the in-process engine (L1, disk, Redis), a cache server
in one pool-sharing mode, and either of those with the forward launched layer by layer (``HookedHit``).
Each stores a prompt's KV once (``store``) and loads it on a hit (``load``), as the presets' adapters do.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_tiers import drop_cache
from prefill_model import free_port, sync

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.layered_load import LayerReady
from lmcache.testing import pool_modes
from lmcache.transfer import BlockTransfer

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "bench/prefill-model"


class BenchFailure(RuntimeError):
    pass


class EngineTier:
    """A hit through ``CacheEngine`` directly (the in-process connector's calls)."""

    def __init__(
        self, name: str, config: LMCacheEngineConfig, space: KeySpace, pool: torch.Tensor, clear_l1: bool
    ) -> None:
        self.name = name
        self.engine = CacheEngine(config)
        self.space = space
        self.pool = pool
        self.clear_l1 = clear_l1
        self.disk_dir: Path | None = Path(config.local_disk) if config.local_disk else None
        self.cold = False
        self.load_stream = torch.cuda.Stream(pool.device) if pool.is_cuda else None

    def stream(self) -> Any:
        return torch.cuda.current_stream() if self.pool.is_cuda else None

    def store(self, tokens: list[int], blocks: list[int], expected: int) -> None:
        stored = self.engine.store(
            self.space, 0, self.pool, BlockTransfer(tokens, None, blocks, 0, len(tokens)), self.stream()
        )
        sync(self.pool.device)
        if stored != expected:
            raise BenchFailure(f"{self.name}: store saved {stored} tokens, expected {expected}")
        tiers = self.engine.tiers
        if tiers is not None:
            if not tiers.flush(timeout=600):
                raise BenchFailure(f"{self.name}: tier writes did not drain")
            for st in self.engine.snapshot().tiers:
                if st.dropped_writes:
                    raise BenchFailure(
                        f"{self.name}: {st.dropped_writes} {st.name} tier writes dropped ({st})"
                    )
                if st.writes == 0:
                    raise BenchFailure(f"{self.name}: nothing was written to the {st.name} tier ({st})")

    def before_repeat(self) -> None:
        if self.clear_l1:
            self.engine.clear()
            if len(self.engine.l1):
                raise BenchFailure(f"{self.name}: L1 not empty after clear()")
        if self.cold and self.disk_dir is not None:
            drop_cache(self.disk_dir)

    def load(
        self, tokens: list[int], blocks: list[int], end: int, rid: int, layers: LayerReady | None = None
    ) -> int:
        """A layer-wise load (``layers``) copies on a stream of its own, after the forward's earlier
        work, as the in-process adapter's; the forward then waits layer by layer."""
        hit = self.engine.lookup(self.space, tokens, pin_id=rid)
        self.looked_up = time.perf_counter()
        if hit < end:
            self.engine.release(rid)
            raise BenchFailure(f"{self.name}: lookup found {hit} tokens, expected >= {end}")
        stream = self.stream()
        if layers is not None and self.load_stream is not None:
            self.load_stream.wait_stream(stream)
            stream = self.load_stream
        transfer = BlockTransfer(tokens, None, blocks, 0, end)
        return self.engine.retrieve(self.space, 0, self.pool, transfer, stream, pin_id=rid, layers=layers)

    def after_length(self) -> None:
        self.engine.clear()

    def close(self) -> None:
        self.engine.close()


class MPTier:
    """A hit through the cache server in one pool-sharing mode: lookup and retrieve round trips, as
    the lmcache-mp adapter makes them."""

    cold = False

    def __init__(
        self, pool: torch.Tensor, tpb: int, chunk: int, l1_gb: float, workdir: Path, mode: str
    ) -> None:
        from lmcache.server.client import CacheServerClient, ServerUnavailable, wait_for_server

        self.pool = pool
        self.mode = mode
        self.name = f"mp_{mode}"
        port = free_port()
        self.log_path = workdir / f"server-{mode}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.setdefault("LMCACHE_LOG_LEVEL", "WARNING")
        cmd = [sys.executable, "-m", "lmcache.v1.multiprocess.server", "--port", str(port)]
        cmd += [
            "--ipc-path",
            str(workdir / f"{mode}.sock"),
            "--chunk-size",
            str(chunk),
            "--l1-size-gb",
            f"{l1_gb:.2f}",
            "--pin-share",  # one instance pins a whole prompt here: this L1 is sized for it alone
            "1",
            *pool_modes.server_args(mode),
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_server(f"tcp://127.0.0.1:{port}", 120)
        except ServerUnavailable:
            self.close()
            raise BenchFailure(f"cache server did not come up; log:\n{self.log()}") from None
        self.client = CacheServerClient(f"ipc://{workdir / f'{mode}.sock'}", timeout_s=120)
        try:
            info = pool_modes.register(self.client, pool, mode, MODEL_NAME, tpb)
        except BaseException:
            self.close()
            raise
        if info.chunk_size != chunk:
            self.close()
            raise BenchFailure(f"server chunk size {info.chunk_size} != {chunk}")
        if info.sharing != pool_modes.expected_sharing(mode, pool.is_cuda):
            self.close()
            raise BenchFailure(f"{self.name}: the pool was registered as {info.sharing!r}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def store(self, tokens: list[int], blocks: list[int], expected: int) -> None:
        sync(self.pool.device)  # the server reads the blocks from another process
        stored = self.client.store(BlockTransfer(tokens, None, blocks, 0, len(tokens)))
        if stored != expected:
            raise BenchFailure(f"{self.name}: store saved {stored} tokens, expected {expected}")

    def before_repeat(self) -> None:
        pass

    def load(
        self, tokens: list[int], blocks: list[int], end: int, rid: int, layers: LayerReady | None = None
    ) -> int:
        hashes = self.client.chunk_hashes(tokens)  # as the adapter: hashed once, for lookup and load
        hit = self.client.lookup(tokens, pin_id=rid, chunk_hashes=hashes)
        self.looked_up = time.perf_counter()
        if hit < end:
            self.client.release(rid)
            raise BenchFailure(f"{self.name}: lookup found {hit} tokens, expected >= {end}")
        # As the adapter: the load is ordered against the forward's stream (on the device in shared-L1
        # mode, the host waiting for the stream first for an exported pool).
        stream = torch.cuda.current_stream() if self.pool.is_cuda else None
        prompt = hashes if hashes is not None else tokens
        transfer = BlockTransfer(prompt, None, blocks, 0, end)
        return self.client.retrieve(transfer, pin_id=rid, stream=stream, layers=layers)

    def after_length(self) -> None:
        self.client.clear()

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


class HookedHit:
    """A tier's hit with the forward launched layer by layer (a CUDA graph per layer, a hook before
    each, as TRT-LLM calls ``wait_for_layer_load`` on its eager forward). ``layerwise``: the load is
    layer-wise too and each hook waits for its layer's KV, as the connector's does once the hooks are
    proven; else the whole load comes first (the same forward, to compare with)."""

    cold = False

    def __init__(self, tier: Any, num_layers: int, layerwise: bool) -> None:
        self.tier, self.num_layers, self.layerwise = tier, num_layers, layerwise
        self.name = f"{tier.name}_{'layerwise' if layerwise else 'hooked'}"
        self.ready: LayerReady | None = None
        self.timeline: list[dict[str, Any]] = []
        """Per layer-wise CUDA hit: host times (lookup answered, load returned) and device events
        (start, layer 0 landed, every layer landed), read by :meth:`phases` once they completed."""
        self._probe = torch.cuda.Stream(tier.pool.device) if layerwise and tier.pool.is_cuda else None

    def before_repeat(self) -> None:
        self.tier.before_repeat()

    def load(self, tokens: list[int], blocks: list[int], end: int, rid: int) -> int:
        self.ready = LayerReady(self.num_layers) if self.layerwise else None
        if self._probe is None or self.ready is None:
            return int(self.tier.load(tokens, blocks, end, rid, layers=self.ready))
        began, start = time.perf_counter(), torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream())
        loaded = int(self.tier.load(tokens, blocks, end, rid, layers=self.ready))
        returned = time.perf_counter()
        # Waits on a stream of its own: the forward's stream is not held by them.
        self.ready.wait(0, self._probe)
        layer0 = torch.cuda.Event(enable_timing=True)
        layer0.record(self._probe)
        self.ready.wait_all(self._probe)
        landed = torch.cuda.Event(enable_timing=True)
        landed.record(self._probe)
        self.timeline.append(
            {
                "lookup_ms": (self.tier.looked_up - began) * 1e3,
                "returned_ms": (returned - began) * 1e3,
                "start": start,
                "layer0": layer0,
                "landed": landed,
            }
        )
        return loaded

    def phases(self) -> dict[str, float]:
        """Medians over the hits since the last call but its first (a warm-up), in ms from the hit's
        start: the lookup answered, the load returned (host), layer 0 and every layer in place (device;
        no earlier than the load returned). Empty unless layer-wise on CUDA."""
        timeline, self.timeline = self.timeline[1:], []
        if not timeline:
            return {}
        rows = [
            {
                "lookup_ms": t["lookup_ms"],
                "load_returned_ms": t["returned_ms"],
                "layer0_landed_ms": t["start"].elapsed_time(t["layer0"]),
                "all_landed_ms": t["start"].elapsed_time(t["landed"]),
            }
            for t in timeline
        ]
        return {key: round(statistics.median(r[key] for r in rows), 3) for key in rows[0]}

    def pre_layer(self, layer: int) -> None:
        if self.ready is not None and self.tier.pool.is_cuda:
            self.ready.wait(layer, torch.cuda.current_stream())
