"""Dense W4A16 NVFP4 GEMM (triton_nvfp4) against cuBLAS bf16, on a CUDA GPU.

For every shape (N x K) and M: correctness first (bf16 activations vs the reference backend on the
GPU, for each path timed), then CUDA-graph median timings with rotating weight copies (no call
finds its weights in L2), the floor (weight bytes at 4.5 bits / measured copy bandwidth, or FLOPs /
measured bf16 matmul rate, whichever is larger), a printed table and JSON in ``--out``.

From M = 64 on, both paths of ``linear`` are checked and timed: the fused kernel and the
large-M path (dequantize in row chunks, then cuBLAS); "us" is the one ``configs.DEQUANTIZE``
selects.

    python benchmarks/bench_gemm.py --out DIR [--tune] [--shapes 4096x4096] [--ms 1,16]
        [--interleaved ROUNDS]

``--interleaved ROUNDS`` first (before the table) times the large-M path (``VARIANTS``: scratch
sizes) and cuBLAS bf16 interleaved: each captured in one CUDA graph over
the same rotating copies, then ROUNDS rounds of a few replays of each in turn (the order
rotating), the median per round; reported: per variant the median (and range) over rounds,
and the median (range) of the per-round ratio cuBLAS / variant (``interleaved.json``).

``--tune`` first times the candidate configs of each (shape, M) and keeps the fastest, and sets
each shape's large-M threshold to the smallest M from which the large-M path is the faster at
every larger M measured (printed as ``configs.DENSE`` / ``configs.DEQUANTIZE`` entries to paste).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys

import torch

from _common import (
    _event_ms, capture_graph, copy_bandwidth, device_info, fmt_table, graph_time_us, matmul_rate, random_nvfp4,
    rel_err, require_cuda, write_json,
)
from quantoracle.backends.reference.linear import linear as reference_linear
from quantoracle.backends.triton_nvfp4 import configs
from quantoracle.backends.triton_nvfp4.gemm import linear, prepare_linear
from quantoracle.backends.triton_nvfp4.layout import CHUNK_K, padded_k

SHAPES = [(4096, 4096), (28672, 8192)]
MS = [1, 16, 64, 256, 1024, 4096]
BOTH_PATHS_FROM_M = 64
PATHS = {"fused": sys.maxsize, "dequantized": 1}  # linear's dequantize_from_m forcing each path
PEERS = {  # DESIGN.md: Marlin NVFP4 / cuBLAS bf16, H100, microseconds
    (4096, 4096): {1: (14.5, 23.6), 4096: (408.0, 177.0)},
    (28672, 8192): {1: (72.6, 175.8), 4096: (5825.0, 2538.0)},
}


def candidates(m: int, k: int) -> list[configs.DenseConfig]:
    d = configs.DenseConfig
    chunks = padded_k(k) // CHUNK_K
    if m <= 16:
        return [d(bn, 16, s, warps, 4) for bn, warps in ((32, 2), (64, 2), (64, 4), (128, 4))
                for s in (1, 2, 4, 8) if s <= chunks // 2 or s == 1]
    if m <= 64:
        return [d(64, 64, s, 4, 4) for s in (1, 2, 4)] + [d(128, 64, s, 4, 3) for s in (1, 2)]
    return [d(128, 128, 1, 8, 3), d(128, 256, 1, 8, 2), d(256, 128, 1, 8, 2),
            d(128, 64, 1, 4, 3), d(64, 128, 1, 4, 3)]


def crossover(shape_results: list[dict]) -> int:
    """The smallest M measured from which the large-M path is the faster at every larger M
    measured (``sys.maxsize`` if it never is)."""
    min_m = sys.maxsize
    for r in sorted(shape_results, key=lambda r: -r["m"]):
        times = r["path_us"]
        if "dequantized" not in times or times["dequantized"] >= times["fused"]:
            break
        min_m = r["m"]
    return min_m


VARIANTS = {"large-M 64 MiB": configs.SCRATCH_BYTES}  # name -> linear's scratch_bytes


def interleaved(shapes, ms, rounds: int, reps: int = 5) -> list[dict]:
    """The large-M path variants (``VARIANTS``) and cuBLAS bf16, interleaved (module docstring).
    Each variant is checked against cuBLAS on the first inputs before timing."""
    info = device_info()
    results = []
    for n, k in shapes:
        weight = random_nvfp4((), n, k, 1, seed=n + k)
        copies = max(2, min(16, math.ceil(4 * info["l2_bytes"] / (n * k * 4.5 / 8))))
        prepared = [prepare_linear(weight) for _ in range(copies)]
        dense = weight.dequantize(torch.bfloat16)
        bf16 = [dense] + [dense.clone() for _ in range(max(1, min(copies, math.ceil(
            4 * info["l2_bytes"] / dense.numel() / 2))) - 1)]
        for m in ms:
            xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
            graphs, errs = {}, {}
            ref = torch.mm(xs[0], dense.T).float()
            for name, scratch in VARIANTS.items():
                def call(x, p, scratch=scratch):
                    return linear(x, p, dequantize_from_m=1, scratch_bytes=scratch)
                errs[name] = ((call(xs[0], prepared[0]).float() - ref).norm() / ref.norm()).item()
                assert errs[name] < 1e-2, f"{n}x{k} M={m} {name}: error {errs[name]:.2e}"
                graphs[name] = capture_graph([lambda x=x, p=p, c=call: c(x, p)
                                         for x, p in zip(xs, prepared)])
            graphs["cuBLAS"] = capture_graph([lambda x=x, w=bf16[i % len(bf16)]: torch.mm(x, w.T)
                                         for i, x in enumerate(xs)])
            names = list(graphs)
            per_round = {name: [] for name in names}
            for r in range(rounds):
                for j in range(len(names)):
                    name = names[(j + r) % len(names)]
                    ms_ = statistics.median(_event_ms(graphs[name].replay, reps))
                    per_round[name].append(ms_ * 1e3 / copies)
            entry = {"shape": [n, k], "m": m, "rounds": rounds, "reps": reps, "rel_err": errs,
                     "per_round_us": per_round, "variants": {}}
            for name in names:
                times = per_round[name]
                ratios = [c / t for c, t in zip(per_round["cuBLAS"], times)]
                entry["variants"][name] = {
                    "median_us": statistics.median(times), "min_us": min(times),
                    "max_us": max(times), "x_cublas": statistics.median(ratios),
                    "x_cublas_min": min(ratios), "x_cublas_max": max(ratios)}
                v = entry["variants"][name]
                print(f"interleaved {n}x{k} M={m} {name}: {v['median_us']:.1f} us "
                      f"({v['min_us']:.1f}..{v['max_us']:.1f}), x cuBLAS {v['x_cublas']:.3f} "
                      f"({v['x_cublas_min']:.3f}..{v['x_cublas_max']:.3f})", flush=True)
            results.append(entry)
            del graphs
        del prepared, bf16, dense
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS")
    args = parser.parse_args()
    require_cuda("bench_gemm")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    if args.interleaved:
        print("wrote", write_json(args.out, "interleaved.json", {
            "info": device_info(), "variants": VARIANTS,
            "results": interleaved(shapes, ms, args.interleaved)}))

    info = device_info()
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    print(f"{info['device']}: copy {bandwidth / 1e12:.2f} TB/s, bf16 mm {rate / 1e12:.0f} TFLOP/s")
    results, tuning = [], []
    for n, k in shapes:
        weight = random_nvfp4((), n, k, 1, seed=n + k)
        weight_bytes = n * k * 4.5 / 8
        copies = max(2, min(16, math.ceil(4 * info["l2_bytes"] / weight_bytes)))
        prepared = [prepare_linear(weight) for _ in range(copies)]
        dense = weight.dequantize(torch.bfloat16)
        bf16_copies = [dense] + [dense.clone() for _ in range(max(1, min(copies, math.ceil(
            4 * info["l2_bytes"] / dense.numel() / 2))) - 1)]
        table = configs.DENSE.setdefault((n, k), dict(configs.DENSE["default"]))
        shape_results = []
        for m in ms:
            xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
            ref = reference_linear(xs[0], weight)
            paths = PATHS if m >= BOTH_PATHS_FROM_M else {"fused": PATHS["fused"]}
            errs = {}
            for path, from_m in paths.items():
                errs[path] = rel_err(linear(xs[0], prepared[0], dequantize_from_m=from_m), ref)
                assert errs[path] < 1e-2, f"{n}x{k} M={m} {path}: relative error {errs[path]:.2e}"
            calls = {path: [lambda x=x, p=p, f=from_m: linear(x, p, dequantize_from_m=f)
                            for x, p in zip(xs, prepared)] for path, from_m in paths.items()}
            if args.tune:
                timed = []
                for cfg in candidates(m, k):
                    table[configs.bucket(m)] = cfg
                    entry = {"shape": [n, k], "m": m, "config": cfg.__dict__}
                    try:
                        us = graph_time_us(calls["fused"], target_s=0.1)
                    except Exception as exc:  # a config the device cannot run: skip it
                        us, entry["error"] = float("inf"), repr(exc)[:200]
                    timed.append((us, cfg))
                    tuning.append({**entry, "us": us})
                table[configs.bucket(m)] = min(timed, key=lambda t: t[0])[1]
            path_us = {path: graph_time_us(c) for path, c in calls.items()}
            cublas = graph_time_us([lambda x=x, w=bf16_copies[i % len(bf16_copies)]:
                                    torch.mm(x, w.T) for i, x in enumerate(xs)])
            floor = max(weight_bytes / bandwidth, 2 * m * n * k / rate) * 1e6
            marlin, cublas_peer = PEERS.get((n, k), {}).get(m, (None, None))
            shape_results.append({
                "shape": [n, k], "m": m, "path_us": path_us, "cublas_us": cublas,
                "floor_us": floor, "rel_err": errs,
                "config": configs.dense_config(m, n, k, padded_k(k) // CHUNK_K).__dict__,
                "peer_marlin_us": marlin, "peer_cublas_us": cublas_peer,
            })
            print(f"{n}x{k} M={m}: " + ", ".join(f"{p} {us:.1f} us" for p, us in path_us.items())
                  + f", cuBLAS {cublas:.1f} us, floor {floor:.1f} us, err "
                  + ", ".join(f"{p} {e:.1e}" for p, e in errs.items()), flush=True)
        if args.tune:
            configs.DEQUANTIZE[(n, k)] = dataclasses.replace(
                configs.dequantize_config(n, k), min_m=crossover(shape_results))
        min_m = configs.dequantize_config(n, k).min_m
        for r in shape_results:
            r["path"] = "dequantized" if r["m"] >= min_m else "fused"
            ours = r["us"] = r["path_us"][r["path"]]
            r.update(speedup_vs_cublas=r["cublas_us"] / ours, floor_fraction=r["floor_us"] / ours,
                     achieved_tb_s=weight_bytes / ours / 1e6)
        results += shape_results
        del prepared, bf16_copies, dense
        torch.cuda.empty_cache()

    headers = ["N x K", "M", "path", "us", "fused us", "dequant us", "cuBLAS us", "x cuBLAS",
               "floor us", "% floor", "TB/s", "Marlin(peer)", "cuBLAS(peer)"]
    rows = [[f"{r['shape'][0]}x{r['shape'][1]}", r["m"], r["path"], r["us"],
             r["path_us"]["fused"], r["path_us"].get("dequantized", ""), r["cublas_us"],
             r["speedup_vs_cublas"], r["floor_us"], 100 * r["floor_fraction"],
             r["achieved_tb_s"], r["peer_marlin_us"] or "", r["peer_cublas_us"] or ""]
            for r in results]
    print(fmt_table(headers, rows))
    if args.tune:
        print("tuned configs.DENSE entries:")
        for shape in shapes:
            print(f"    {shape}: {{" + ", ".join(
                f"{b}: _d({c.block_n}, {c.block_m}, {c.split_k}, {c.num_warps}, {c.num_stages})"
                for b, c in sorted(configs.DENSE[shape].items())) + "},")
        print("tuned configs.DEQUANTIZE entries:")
        for shape in shapes:
            print(f"    {shape}: DequantizeConfig({configs.dequantize_config(*shape).min_m}),")
    path = write_json(args.out, "bench_gemm.json", {
        "info": info, "copy_bandwidth": bandwidth, "matmul_rate": rate,
        "results": results, "tuning": tuning,
    })
    print("wrote", path)


if __name__ == "__main__":
    main()
