"""Charts of the benchmark JSON files, as PNGs under ``docs/`` (the card's name in every title).

- ``--ttft`` (from ``bench_ttft.py``): TTFT vs prompt length, one line per tier (``--ttft-tiers``: only
  these), the recompute line included; a second panel with the speedup over recompute -> ``docs/ttft.png``;
- ``--engine`` (from ``bench_engine.py``): L1 store / retrieve bandwidth for adjacent and scattered
  blocks next to the plain pinned-copy ceiling measured in the same run -> ``docs/bandwidth.png``;
- ``--workload`` (from ``bench_workload.py``): mean TTFT, total time and hit rate, connector vs
  none -> ``docs/workload.png``;
- ``--overhead`` (from ``bench_overhead.py``): the ratios of (a) and (b), from one file or from one
  run of each part (same card and model) -> ``docs/overhead.png``.

    python benchmarks/plot_results.py --ttft ttft.json [--ttft-tiers recompute l1 ...] --engine engine.json \\
        [--workload w.json] [--overhead o.json [o_b.json]] [--outdir docs] [--suffix _h100]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

TIER_LABELS = {
    "recompute": "recompute (full prefill)",
    "l1": "L1 hit (pinned CPU, in-process)",
    "disk": "disk hit (page cache warm)",
    "disk_cold": "disk hit (page cache cold)",
    "redis": "Redis hit",
    "mp": "L1 hit via cache server (MP)",
    "mp_shared-l1": "L1 hit via cache server (shared-l1)",
    "mp_export": "L1 hit via cache server (export)",
    "l1_layerwise": "L1 hit, layer-wise load (in-process)",
    "mp_shared-l1_layerwise": "L1 hit, layer-wise load via cache server (shared-l1)",
    "mp_export_layerwise": "L1 hit, layer-wise load via cache server (export)",
}


def load(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def title_suffix(data: dict[str, Any]) -> str:
    model = data.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    parts = [data.get("card") or data.get("device", "?")]
    if name:
        parts.append(f"{name} {data.get('dtype', '')}".strip())
    return " | ".join(parts)


def chosen_tiers(data: dict[str, Any], wanted: list[str] | None) -> list[str]:
    """The tiers to draw: ``wanted`` in its order (each must be in the file), else all the file has."""
    if not wanted:
        return list(data["tiers"])
    unknown = [t for t in wanted if t not in data["tiers"]]
    if unknown:
        raise SystemExit(f"--ttft-tiers: {unknown} not in the TTFT file; it has {data['tiers']}")
    return wanted


def plot_ttft(data: dict[str, Any], out: Path, tiers: list[str]) -> None:
    rows = data["results"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for tier in tiers:
        pts = sorted((r["tokens"], r["median_ms"], r["speedup"]) for r in rows if r["tier"] == tier)
        if not pts:
            continue
        xs, ys, sp = zip(*pts, strict=True)
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if tier == "recompute" else {}
        ax.plot(xs, ys, marker="o", label=TIER_LABELS.get(tier, tier), **style)
        if tier != "recompute":
            ax2.plot(xs, sp, marker="o", label=TIER_LABELS.get(tier, tier))
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("prompt length (tokens)")
        a.set_xticks(data["prompt_lengths"], [str(n) for n in data["prompt_lengths"]])
        a.grid(True, which="both", alpha=0.3)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("time to first token (ms, median)")
    ax.set_title("TTFT: recompute vs cache hit")
    ax.legend(fontsize=8)
    ax2.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax2.set_ylabel("speedup over recompute (x)")
    ax2.set_title("TTFT speedup of a full-prefix hit")
    ax2.legend(fontsize=8)
    chunk = f"chunk {data.get('chunk_size')}, {data.get('tokens_per_block')} tokens/block"
    fig.suptitle(f"{title_suffix(data)} | {chunk}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_bandwidth(data: dict[str, Any], out: Path) -> None:
    layouts = [k for k in ("adjacent_blocks", "scattered_blocks") if k in data]
    if not layouts:
        raise SystemExit("engine JSON has neither adjacent_blocks nor scattered_blocks")
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.2
    for i, name in enumerate(layouts):
        r = data[name]
        bars = [
            ("store (GPU->L1)", r["store_gbps"], "tab:blue"),
            ("plain copy D2H", r["copy_d2h_gbps"], "lightsteelblue"),
            ("retrieve (L1->GPU)", r["retrieve_gbps"], "tab:orange"),
            ("plain copy H2D", r["copy_h2d_gbps"], "navajowhite"),
        ]
        for j, (label, value, color) in enumerate(bars):
            x = i + (j - 1.5) * width
            ax.bar(x, value, width, color=color, label=label if i == 0 else None, edgecolor="black")
            ax.text(x, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(layouts)), [n.replace("_", " ") for n in layouts])
    ax.set_ylabel("GB/s")
    gib = data["adjacent_blocks"]["bytes"] / 2**30 if "adjacent_blocks" in data else 0
    ax.set_title(
        f"L1 store / retrieve vs the pinned-copy ceiling ({data.get('tokens')} tokens = {gib:.2f} GiB per op)"
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title_suffix(data) + " | Qwen2-1.5B-shaped pool, 256-token chunks")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_workload(data: dict[str, Any], out: Path) -> None:
    names = list(data["workloads"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    metrics = [
        ("mean_ttft_ms", "mean TTFT (ms)"),
        ("total_s", "total time (s)"),
        ("hit_rate", "prefix hit rate"),
    ]
    width = 0.35
    for ax, (key, label) in zip(axes, metrics, strict=True):
        for j, variant in enumerate(("no_connector", "connector")):
            vals = [data["workloads"][n][variant][key] for n in names]
            xs = [i + (j - 0.5) * width for i in range(len(names))]
            ax.bar(xs, vals, width, label=variant.replace("_", " "), edgecolor="black")
            for x, v in zip(xs, vals, strict=True):
                ax.text(
                    x,
                    v,
                    f"{v:.0%}" if key == "hit_rate" else f"{v:.3g}",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names])
        ax.set_title(label)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    pool = next(iter(data["workloads"].values()))["gpu_pool_tokens"]
    fig.suptitle(f"{title_suffix(data)} | GPU pool {pool} tokens, device block reuse in both variants")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def merged_overhead(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure's data from ``bench_overhead.py`` files of one card and model: part (a)'s
    ``connector_iteration`` and part (b)'s ``saves_in_flight``, each from the one file that has it."""
    merged = dict(parts[0])
    for key in ("card", "model"):
        values = {json.dumps(p.get(key), sort_keys=True) for p in parts}
        if len(values) > 1:
            raise SystemExit(f"--overhead: the files differ in {key} ({sorted(values)}); give one card's")
    for key in ("connector_iteration", "saves_in_flight"):
        having = [p[key] for p in parts if key in p]
        if len(having) > 1:
            raise SystemExit(f"--overhead: {len(having)} files have {key}; give each part once")
        merged[key] = having[0] if having else {}
    if not merged["connector_iteration"] and not merged["saves_in_flight"]:
        raise SystemExit("--overhead: no file has connector_iteration or saves_in_flight")
    return merged


def plot_overhead(data: dict[str, Any], out: Path) -> None:
    labels, ratios = [], []
    for name, r in data["connector_iteration"].items():
        labels.append(f"(a) {name.replace('_', ' ')} iteration\nconnector at 0% hits")
        ratios.append(r["ratio"])
    tokens = data["saves_in_flight"].get("save_tokens")
    saving = f"{tokens // 1024}k-token" if tokens else "prompt's"
    for name, r in data["saves_in_flight"].items():
        if isinstance(r, dict):
            labels.append(f"(b) {name.replace('_', ' ')}\nwith a {saving}\nsave in flight")
            ratios.append(r["ratio"])
    fig, ax = plt.subplots(figsize=(max(11, 2 * len(ratios)), 4.5))
    ax.bar(range(len(ratios)), ratios, edgecolor="black", color="tab:green")
    for i, v in enumerate(ratios):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("time ratio vs no connector / no saves")
    ax.set_ylim(0, max(1.2, max(ratios) * 1.15))
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{title_suffix(data)} | forward-path overhead of the in-process connector")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ttft", help="bench_ttft.py JSON")
    parser.add_argument("--ttft-tiers", nargs="+", help="draw only these tiers of --ttft, in this order")
    parser.add_argument("--engine", help="bench_engine.py JSON")
    parser.add_argument("--workload", help="bench_workload.py JSON")
    parser.add_argument("--overhead", nargs="+", help="bench_overhead.py JSON (or one per part, a and b)")
    parser.add_argument("--outdir", default=str(Path(__file__).resolve().parents[1] / "docs"))
    parser.add_argument("--suffix", default="", help="appended to each file name, e.g. _h100")
    args = parser.parse_args()
    if not any((args.ttft, args.engine, args.workload, args.overhead)):
        parser.error("give at least one of --ttft, --engine, --workload, --overhead")
    if args.ttft_tiers and not args.ttft:
        parser.error("--ttft-tiers needs --ttft")
    jobs: list[tuple[str, Callable[[Path], None]]] = []
    if args.ttft:
        ttft = load(args.ttft)
        tiers = chosen_tiers(ttft, args.ttft_tiers)
        jobs.append(("ttft", lambda out: plot_ttft(ttft, out, tiers)))
    if args.engine:
        jobs.append(("bandwidth", lambda out: plot_bandwidth(load(args.engine), out)))
    if args.workload:
        jobs.append(("workload", lambda out: plot_workload(load(args.workload), out)))
    if args.overhead:
        overhead = merged_overhead([load(path) for path in args.overhead])
        jobs.append(("overhead", lambda out: plot_overhead(overhead, out)))
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for name, plot in jobs:
        out = outdir / f"{name}{args.suffix}.png"
        plot(out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
