"""Time to first token: recompute vs a cache hit from each tier, with a Qwen2-1.5B-shaped model.

For each prompt length (default 1k, 4k, 16k, 32k tokens; ``--small``: 128 and 256) and in one run:

- ``recompute``: a full prefill of the prompt (``prefill_model.py``: real attention over TRT-LLM's
  paged pool, bf16 on CUDA), timed to the last token's logits;
- a hit from each tier: the prompt's KV was stored once after a first prefill (untimed); the timed
  part is what the connector does on a repeat of the prompt: ``lookup`` (hashing, pinning,
  promotion from a lower tier), ``retrieve`` of ``[0, L)`` into *other* pool blocks (``L`` = the
  hit, block-aligned, never the last prompt token: ``min(hit, len - 1)`` rounded down to a block),
  then the prefill of the remaining ``len - L`` tokens, until their logits are on the host's side
  of a synchronize. Tiers:

  - ``l1``: the in-process path, straight on ``CacheEngine`` (pinned CPU L1), loads on the
    forward's stream as the in-process adapter does;
  - ``disk``: engine with ``local_disk`` in a temp dir; L1 is cleared before every repeat, so the
    chunks come from the files (page cache warm) through promotion into L1, then the copy;
  - ``disk_cold`` (``--disk-cold``): the same with the files evicted from the page cache
    (``posix_fadvise(DONTNEED)`` after a sync) before every repeat;
  - ``redis`` (``--redis-url``): engine with ``remote_url`` and no disk; L1 cleared every repeat;
  - ``mp_MODE`` (``--mp``): for each pool-sharing mode of ``--mp-modes`` (default ``export`` and
    ``shared-l1``), a cache server subprocess (``python -m lmcache.v1.multiprocess.server
    --pool-sharing MODE``) with the pool registered through ``CacheServerClient.register`` in that
    mode; lookup + retrieve are round trips to it, as the ``lmcache-mp`` adapter makes them. In
    ``export`` the server maps the pool (CUDA IPC on GPU, shared memory on CPU): the pool is a
    PyTorch CUDA tensor (exported with ``cudaIpcGetMemHandle`` on its allocation), so
    ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` must not be set for it. In ``shared-l1``
    the client copies between the pool and the server's L1 in shared memory. Each ``mp_MODE`` row
    also has ``vs_inprocess`` (the ``l1`` TTFT over its own: at least 1 means the server is as fast
    as in-process) and, for modes after the first, ``vs_MODE0`` (the first mode's TTFT over its own).

Correctness, checked on every repeat (a wrong load fails the benchmark with exit status 1):
the loaded pool rows must be **bitwise** equal to the rows of the first prefill, and the hit's
logits **bitwise** equal to a reference that prefills the same remaining tokens over the original
blocks (what device prefix reuse would compute: same kernels, same shapes). Against the full
recompute the logits can only agree within numeric noise (different batch split): checked with
``max|a-b|/max|b| <= 0.1`` and cosine >= 0.99 in bf16 (1e-3 / 0.99999 in float32).

Numbers: median (and min) of ``--repeats`` runs after one warm-up; speedup = recompute median / tier
median. ``remainder_ms`` is the prefill of the remaining tokens alone, so ``load_ms_est`` = TTFT -
remainder is roughly what lookup + load cost (and ``load_gbps_est`` the bytes loaded over it). With
``--layerwise`` on CUDA each ``*_layerwise`` row has ``phases``: medians, in ms from the hit's start,
of when the lookup answered and the load returned (host), and when layer 0 and every layer were in
place (device).

    python benchmarks/bench_ttft.py --device cuda [--mp [--mp-modes export,shared-l1]] [--disk-cold] \\
        [--redis-url redis://..] [--lengths 1024,4096,16384,32768] [--out ttft.json]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
from collections.abc import Iterator
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
    summary_ms,
    sync,
    timed,
    write_json,
)
from ttft_tiers import MODEL_NAME, BenchFailure, EngineTier, HookedHit, MPTier  # noqa: E402

from lmcache.config import LMCacheEngineConfig  # noqa: E402
from lmcache.engine import KeySpace  # noqa: E402
from lmcache.layout import PoolLayout  # noqa: E402
from lmcache.server.reserved_shares import INSTANCE_SHARE  # noqa: E402
from lmcache.testing import pool_modes  # noqa: E402

GIB = 1 << 30


class HitCase:
    """One prompt whose KV sits in ``source`` blocks and in the tiers; a hit loads it into ``target``."""

    def __init__(
        self,
        model: PrefillModel,
        pool: torch.Tensor,
        source: list[int],
        target: list[int],
        target_index: torch.Tensor,
        tokens: list[int],
        load_end: int,
        reference: torch.Tensor,
        bitwise_logits: bool = True,
    ) -> None:
        self.model, self.pool = model, pool
        self.source, self.target, self.target_index = source, target, target_index
        self.tokens, self.load_end, self.reference = tokens, load_end, reference
        self.rest = tokens[load_end:]
        self.bitwise_logits = bitwise_logits

    def hit(self, tier: Any, rid: int) -> torch.Tensor:
        """The timed part: lookup + retrieve (the tier's), then the prefill of the remaining tokens."""
        loaded = tier.load(self.tokens, self.target, self.load_end, rid)
        if loaded != self.load_end:
            raise BenchFailure(f"{tier.name}: retrieve loaded {loaded} of {self.load_end} tokens")
        hook = getattr(tier, "pre_layer", None)
        return self.model.prefill(self.pool, self.rest, self.load_end, self.target, pre_layer=hook)

    def check(self, logits: torch.Tensor, what: str) -> None:
        rows = self.load_end // self.model.tpb
        pool = self.pool
        if not torch.equal(pool[self.target[:rows]], pool[self.source[:rows]]):
            raise BenchFailure(f"{what}: loaded KV rows differ from the computed ones")
        if self.bitwise_logits and not torch.equal(logits, self.reference):
            diff = float((logits - self.reference).abs().max())
            raise BenchFailure(
                f"{what}: logits differ from the device-reuse reference (max abs diff {diff}) although the "
                "loaded KV rows are bitwise equal: the model's kernels are not deterministic on this "
                "machine; rerun with --no-bitwise-logits (the logits are then checked within tolerance)"
            )
        ok, metrics = logits_close(logits, self.reference, self.model.dtype)
        if not ok:
            raise BenchFailure(f"{what}: logits too far from the device-reuse reference {metrics}")

    def measure(
        self, name: str, tier: Any, repeats: int, rids: Iterator[int]
    ) -> tuple[list[float], torch.Tensor]:
        """Seconds of ``repeats`` hits after one warm-up, each checked; and the last logits."""
        samples = []
        for i in range(repeats + 1):
            self.pool.index_fill_(0, self.target_index, float("nan"))  # stale KV must not pass the checks
            tier.before_repeat()
            rid = next(rids)
            seconds, logits = timed(lambda rid=rid: self.hit(tier, rid), self.model.device)
            self.check(logits, f"{name} {len(self.tokens)} tokens")
            if i:
                samples.append(seconds)
        return samples, logits


def compare_modes(rows: list[dict[str, Any]], modes: list[str]) -> None:
    """Add to each ``mp_MODE`` row of one prompt length its TTFT ratio to in-process (``vs_inprocess``:
    the ``l1`` median over its own) and, after the first mode, to the first (``vs_MODE0``)."""
    by_tier = {r["tier"]: r for r in rows}
    first = by_tier.get(f"mp_{modes[0]}") if modes else None
    for mode in modes:
        row = by_tier[f"mp_{mode}"]
        row["vs_inprocess"] = by_tier["l1"]["median_ms"] / row["median_ms"]
        if first is not None and row is not first:
            row[f"vs_{modes[0]}"] = first["median_ms"] / row["median_ms"]


def compare_layerwise(rows: list[dict[str, Any]]) -> None:
    """Add to each ``*_layerwise`` row its TTFT ratio to the same tier's ``*_hooked`` row (the same
    per-layer forward after a whole load): ``vs_hooked`` above 1 is what loading by layer gained."""
    by_tier = {r["tier"]: r for r in rows}
    for row in rows:
        if row["tier"].endswith("_layerwise"):
            hooked = by_tier[row["tier"].removesuffix("_layerwise") + "_hooked"]
            row["vs_hooked"] = hooked["median_ms"] / row["median_ms"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = build_model(args)
    dev, tpb, chunk = model.device, model.tpb, args.chunk_size
    default_lengths = "128,256" if args.small else "1024,4096,16384,32768"
    lengths = [int(s) for s in (args.lengths or default_lengths).split(",")]
    nb = model.blocks_for(max(lengths))
    pool = model.new_pool(2 * nb)
    if args.mp and not pool.is_cuda:
        pool.share_memory_()  # CPU pools reach the server through shared memory
    source = list(range(nb))
    target = list(range(2 * nb - 1, nb - 1, -1)) if args.scattered else list(range(nb, 2 * nb))
    target_index = torch.tensor(target, device=dev)
    layout = PoolLayout.of_pool(pool, tpb)
    layout.blocks_per_chunk(chunk)
    space = KeySpace(MODEL_NAME, layout)
    bpt = layout.bytes_per_token
    max_bytes = max(lengths) * bpt
    l1_gb = max_bytes * 1.25 / GIB + 0.1
    all_gb = sum(lengths) * bpt * 1.25 / GIB + 0.1
    results = describe(model, args)
    results.update(
        {"prompt_lengths": lengths, "repeats": args.repeats, "scattered_target_blocks": args.scattered}
    )

    workdir = Path(tempfile.mkdtemp(prefix="lmc-ttft-", dir=args.disk_dir))
    base = {"chunk_size": chunk, "max_local_cpu_size": l1_gb}
    tiers: list[Any] = []
    try:
        tiers.append(EngineTier("l1", LMCacheEngineConfig.from_defaults(**base), space, pool, clear_l1=False))
        if not args.no_disk:
            disk_cfg = LMCacheEngineConfig.from_defaults(
                **base,
                local_disk=str(workdir / "disk"),
                max_local_disk_size=all_gb,
                extra_config={"tier_write_queue_bytes": int(max_bytes * 1.25)},
            )
            tiers.append(EngineTier("disk", disk_cfg, space, pool, clear_l1=True))
        if args.redis_url:
            redis_cfg = LMCacheEngineConfig.from_defaults(
                **base,
                remote_url=args.redis_url,
                extra_config={"tier_write_queue_bytes": int(max_bytes * 1.25)},
            )
            tiers.append(EngineTier("redis", redis_cfg, space, pool, clear_l1=True))
        if args.mp:
            # a shared-l1 store reserves at most INSTANCE_SHARE of the server's L1: the longest prompt fits
            mp_gb = max(all_gb, max_bytes * 1.1 / INSTANCE_SHARE / GIB + 0.1)
            tiers += [MPTier(pool, tpb, chunk, mp_gb, workdir, mode) for mode in args.mp_modes]
        hooked = [
            HookedHit(tier, model.dims.num_layers, layerwise)
            for tier in tiers
            if args.layerwise and tier.name in ("l1", "mp_shared-l1")
            for layerwise in (False, True)
        ]
        names = (
            ["recompute"]
            + [t.name for t in tiers]
            + (["disk_cold"] if args.disk_cold and not args.no_disk else [])
            + [hit.name for hit in hooked]
        )
        results["tiers"] = names
        rows: list[dict[str, Any]] = []
        results["results"] = rows
        rids = itertools.count(1)
        for n in lengths:
            tokens = random_tokens(n, model.dims.vocab, args.seed * 1_000_003 + n)
            load_end = min(n // chunk * chunk, (n - 1) // tpb * tpb)
            expected_store = n // chunk * chunk
            if load_end <= 0:
                raise BenchFailure(f"a {n}-token prompt has no cacheable chunk (chunk size {chunk})")

            def recompute(toks: list[int] = tokens) -> torch.Tensor:
                return model.prefill(pool, toks, 0, source)

            full_logits = recompute()
            times = [timed(recompute, dev)[0] for _ in range(args.repeats)]
            rec = summary_ms(times)
            rows.append(
                {
                    "tokens": n,
                    "tier": "recompute",
                    **rec,
                    "speedup": 1.0,
                    "prefilled_tokens": n,
                    "tok_per_s": n / (rec["median_ms"] / 1e3),
                }
            )
            # The KV of the prompt is in the source blocks now: store it in every tier (untimed).
            for tier in tiers:
                tier.store(tokens, source, expected_store)

            def remainder(r: list[int] = tokens[load_end:], s: int = load_end) -> torch.Tensor:
                return model.prefill(pool, r, s, source)

            reference = remainder()
            sync(dev)
            rem_ms = summary_ms([timed(remainder, dev)[0] for _ in range(args.repeats)])["median_ms"]
            ok, vs_full = logits_close(reference, full_logits, model.dtype)
            if not ok:
                raise BenchFailure(
                    f"{n} tokens: prefill after a prefix disagrees with the full prefill {vs_full}"
                )

            variants: list[tuple[str, Any]] = [(t.name, t) for t in tiers]
            variants += [(hit.name, hit) for hit in hooked]
            if args.disk_cold and not args.no_disk:
                variants.append(("disk_cold", next(t for t in tiers if t.name == "disk")))
            case = HitCase(
                model,
                pool,
                source,
                target,
                target_index,
                tokens,
                load_end,
                reference,
                not args.no_bitwise_logits,
            )
            for name, tier in variants:
                tier.cold = name == "disk_cold"
                samples, logits = case.measure(name, tier, args.repeats, rids)
                tier.cold = False
                ok, vs_rec = logits_close(logits, full_logits, model.dtype)
                if not ok:
                    raise BenchFailure(f"{name} {n} tokens: logits too far from the recompute {vs_rec}")
                s = summary_ms(samples)
                phases = tier.phases() if isinstance(tier, HookedHit) else {}
                rows.append(
                    {
                        "tokens": n,
                        "tier": name,
                        **s,
                        "speedup": rec["median_ms"] / s["median_ms"],
                        "loaded_tokens": load_end,
                        "prefilled_tokens": n - load_end,
                        "remainder_ms": rem_ms,
                        "loaded_bytes": load_end * bpt,
                        "load_ms_est": s["median_ms"] - rem_ms,
                        "load_gbps_est": load_end * bpt / max(s["median_ms"] - rem_ms, 1e-3) / 1e6,
                        "kv_rows_bitwise_equal": True,
                        "logits_bitwise_equal_reference": not args.no_bitwise_logits,
                        "vs_recompute": vs_rec,
                        **({"phases": phases} if phases else {}),
                    }
                )
            compare_modes([r for r in rows if r["tokens"] == n], args.mp_modes if args.mp else [])
            compare_layerwise([r for r in rows if r["tokens"] == n])
            for tier in tiers:
                tier.after_length()
    finally:
        for tier in tiers:
            tier.close()
        shutil.rmtree(workdir, ignore_errors=True)
    how = "within tolerance of" if args.no_bitwise_logits else "bitwise equal to"
    results["checks"] = (
        f"every hit repeat: loaded KV rows bitwise equal to the computed rows; logits {how} a "
        "prefill of the same remaining tokens over the original blocks; logits vs full recompute within "
        "max_rel_diff <= 0.1 and cosine >= 0.99 (bf16) or 1e-3 / 0.99999 (float32)"
    )
    return results


def print_table(results: dict[str, Any]) -> None:
    print(
        f"card: {results['card']}  model: {results['model']['name']} {results['dtype']}  "
        f"chunk {results['chunk_size']}, {results['tokens_per_block']} tok/block, "
        f"{results['kv_bytes_per_token'] / 1024:.0f} KiB/token"
    )
    names = results["tiers"]
    by = {(r["tokens"], r["tier"]): r for r in results["results"]}
    print(f"{'tokens':>7}" + "".join(f"{name:>20}" for name in names) + f"{'recompute tok/s':>18}")
    for n in results["prompt_lengths"]:
        cells = []
        for name in names:
            r = by.get((n, name))
            if r is None:
                cells.append(f"{'-':>20}")
            elif name == "recompute":
                cells.append(f"{r['median_ms']:>17.2f} ms")
            else:
                cells.append(f"{r['median_ms']:>9.2f} ms {r['speedup']:>6.1f}x")
        tps = by[(n, "recompute")]["tok_per_s"]
        print(f"{n:>7}" + "".join(cells) + f"{tps / 1e3:>17.1f}k")
    for n in results["prompt_lengths"]:
        ratios = [
            f"{r['tier']} {r['vs_inprocess']:.3f}"
            for r in results["results"]
            if r["tokens"] == n and "vs_inprocess" in r
        ]
        if ratios:
            print(f"{n:>7} tokens, in-process TTFT / server TTFT: " + ", ".join(ratios))
        rows = [r for r in results["results"] if r["tokens"] == n and "vs_hooked" in r]
        gains = [f"{r['tier']} {r['vs_hooked']:.3f}" for r in rows]
        if gains:
            print(f"{n:>7} tokens, TTFT after a whole load / layer-wise: " + ", ".join(gains))
        for r in rows:
            if "phases" in r:
                phases = ", ".join(f"{key} {value:.2f}" for key, value in r["phases"].items())
                print(f"{n:>7} tokens, {r['tier']} phases: {phases}")
    print(
        "TTFT median of repeats; speedup vs recompute; every hit checked bitwise (see 'checks' in the JSON)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument(
        "--lengths", help="prompt lengths, comma-separated (default 1k,4k,16k,32k; --small 128,256)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--disk-dir", default=None, help="parent of the temp dir for the disk tier (default /tmp)"
    )
    parser.add_argument("--no-disk", action="store_true", help="skip the disk tier")
    parser.add_argument(
        "--disk-cold", action="store_true", help="also measure disk hits with a cold page cache"
    )
    parser.add_argument(
        "--redis-url", default=None, help="also measure Redis hits (e.g. redis://localhost:6379)"
    )
    parser.add_argument("--mp", action="store_true", help="also measure hits through the cache server")
    parser.add_argument(
        "--mp-modes",
        default=",".join(pool_modes.MODES),
        help="pool-sharing modes of the --mp servers, one tier each (default: all, side by side)",
    )
    parser.add_argument("--scattered", action="store_true", help="load into non-adjacent blocks")
    parser.add_argument(
        "--layerwise",
        action="store_true",
        help="also time l1 (and mp_shared-l1) hits with the forward launched layer by layer, after a "
        "whole load (_hooked) and loading layer-wise (_layerwise)",
    )
    parser.add_argument(
        "--no-bitwise-logits",
        action="store_true",
        help="check hit logits vs the reference within tolerance, not bitwise (KV rows stay bitwise)",
    )
    args = parser.parse_args()
    try:
        args.mp_modes = pool_modes.parse_modes(args.mp_modes)
    except ValueError as e:
        parser.error(str(e))
    try:
        results = run(args)
    except BenchFailure as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print_table(results)
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
