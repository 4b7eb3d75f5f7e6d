"""Plot speedup vs M from the JSON of bench_moe.py / bench_gemm.py (needs matplotlib:
``pip install matplotlib``; it is in no quantoracle extra).

    python benchmarks/plot.py docs/performance/bench_moe.json docs/performance/bench_gemm.json \
        --out docs/performance/speedup.png

One panel per benchmark file: for each shape, our time's speedup over the bf16 baseline
measured in the same run (solid) and, where DESIGN.md gives one, over the peers' numbers
(dashed: the best FP4 peer for MoE, Marlin for dense); a line at 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def _series(results, baseline_key, peer_key):
    by_shape = defaultdict(list)
    for r in results:
        by_shape[tuple(r["shape"])].append(r)
    for shape, rows in by_shape.items():
        rows.sort(key=lambda r: r["m"])
        ms = [r["m"] for r in rows]
        base = [r[baseline_key] / r["us"] if r.get(baseline_key) else None for r in rows]
        peer = [(r["m"], r[peer_key] / r["us"]) for r in rows if r.get(peer_key)]
        yield shape, ms, base, peer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--out", default="speedup.png")
    args = parser.parse_args()
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("plot.py: needs matplotlib, which is not installed: pip install matplotlib", file=sys.stderr)
        sys.exit(2)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.files), figsize=(6.5 * len(args.files), 4.5),
                             squeeze=False)
    for ax, path in zip(axes[0], args.files):
        data = json.load(open(path))
        moe = "bench_moe" in path
        keys = ("bf16_us", "design_fp4_peer_us") if moe else ("cublas_us", "peer_marlin_us")
        for shape, ms, base, peer in _series(data["results"], *keys):
            label = ",".join(map(str, shape)) if moe else "x".join(map(str, shape))
            line, = ax.plot(ms, base, marker="o", label=f"{label} vs {'bf16' if moe else 'cuBLAS'}")
            if peer:  # the peers were measured at a few M only: no line through gaps
                ax.plot(*zip(*peer), marker="x", linestyle="--" if len(peer) > 2 else "none",
                        color=line.get_color(),
                        label=f"{label} vs {'best FP4 peer' if moe else 'Marlin'}")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup (baseline time / our time)")
        kind = "fused MoE (W4A16 NVFP4)" if moe else "dense GEMM (W4A16 NVFP4)"
        ax.set_title(f"{kind}, {data['info']['device']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
