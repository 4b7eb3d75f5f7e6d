"""The Humming backend on a CUDA GPU at the benchmark shapes: correctness against the reference
backend (eager and under CUDA-graph capture), JIT-compile cost, and CUDA-graph timings beside
triton_nvfp4 and beside the peers kit's Humming (vLLM's way of driving it) on the same weights
and inputs, in one process.

For every MoE shape (E, H, I, k) and dense N x K, ``prepare`` (the whole of Humming's tuning
list compiled, as the plugin does) is timed, then for each M:

- the relative error ``||y - y_ref|| / ||y_ref||`` against the reference backend (bf16 inputs);
- ``graph_equal``: a graph captured on one input, replayed, equals the eager call bit for bit;
- ``graph_new_inputs_equal``: after new inputs (and routings) are copied into the captured
  buffers and the captured output is poisoned with NaN, the replay equals an eager call on the
  new inputs bit for bit (what a serving engine does with a captured graph);
- ``_common.graph_time_us`` timings with rotating routings / inputs (MoE) or rotating weight
  copies (dense) so no call finds its weights in L2: ``humming_us`` (this backend),
  ``triton_us`` and, with ``--kit DIR`` (the kit's ``humming`` folder, ``.peers/humming``),
  ``kit_us``: the kit's vLLM-driven Humming (its own align, activation and top-k sum) timed the
  same way, interleaved with ours.

JSON is rewritten to ``--out`` after every cell (a run stopped by its time limit keeps what it
measured); ``--budget-s`` stops starting new cells.

    python benchmarks/check_humming.py --out DIR [--budget-s 240] [--no-triton] [--kit .peers/humming]
        [--ms 1,4,16,64,256,1024,4096]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

import torch

from _common import (
    device_info, fmt_table, graph_checks, graph_time_us, random_nvfp4, rel_err, require_cuda, write_json,
)
from quantoracle.backends.humming import TOLERANCE
from quantoracle.backends.humming import kernels as humming
from quantoracle.backends.reference.linear import linear as reference_linear
from quantoracle.backends.reference.moe import fused_moe as reference_moe
from quantoracle.schemes.tensors import MoEWeights, NVFP4Tensor

MOE_SHAPES = [(256, 2048, 512, 8), (128, 2048, 768, 8), (8, 4096, 14336, 2), (256, 7168, 2048, 8)]
DENSE_SHAPES = [(4096, 4096), (28672, 8192), (7168, 2048)]
MS = [1, 4, 16, 64, 256, 1024, 4096]


def routing(m: int, experts: int, top_k: int, g: torch.Generator):
    logits = torch.randn(m, experts, device="cuda", generator=g)
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    return weights, ids


class Kit:
    """The peers kit's Humming (``<kit>/humming_nvfp4.py``: vLLM's conversion, tuning lists,
    CUDA align from ``<kit>/../marlin``, activation and top-k sum), imported from the kit folder
    at run time; nothing of it is part of quantoracle."""

    def __init__(self, folder: str) -> None:
        folder = os.path.abspath(folder)
        for path in (folder, os.path.join(os.path.dirname(folder), "marlin")):
            sys.path.insert(0, path)
        import humming_nvfp4
        import marlin_nvfp4

        self.hm, self.align = humming_nvfp4, marlin_nvfp4.moe_align_block_size

    def prepare_moe(self, weights: MoEWeights, ms, top_k):
        gu, dn = weights.gate_up, weights.down
        state = self.hm.prepare_moe(gu.packed, gu.block_scale, gu.global_scale[:, 0],
                                    dn.packed, dn.block_scale, dn.global_scale[:, 0])
        state.prepare_ms(ms, top_k)
        return lambda x, w, ids: self.hm.fused_moe(x, state, w, ids, self.align)

    def prepare_linear(self, weight: NVFP4Tensor, ms):
        state = self.hm.prepare_linear(weight.packed, weight.block_scale, weight.global_scale)
        state.prepare_ms(ms)
        return lambda x: self.hm.linear(x, state)


def moe_weights(experts: int, hidden: int, inter: int) -> MoEWeights:
    """Random NVFP4 experts; gate and up share one global scale per expert, as ModelOpt exports
    them (Humming then keeps it in fp32)."""
    gate_up = random_nvfp4((experts,), 2 * inter, hidden, 2, seed=1)
    shared = gate_up.global_scale[:, :1].expand(experts, 2).contiguous()
    gate_up = NVFP4Tensor(gate_up.packed, gate_up.block_scale, shared)
    return MoEWeights(gate_up, random_nvfp4((experts,), hidden, inter, 1, seed=2))


def skip(kind: str, shape, ms, record) -> None:
    for m in ms:
        record({"kind": kind, "shape": list(shape), "m": m, "skipped": "budget"})


def check_moe(shape, ms, info, triton, kit, record, over_budget) -> None:
    experts, hidden, inter, top_k = shape
    if over_budget():
        return skip("moe", shape, ms, record)
    weights = moe_weights(experts, hidden, inter)
    start = time.perf_counter()
    prepared = humming.prepare_moe(weights)
    prepare_s = time.perf_counter() - start
    tri = None
    if triton:
        from quantoracle.backends.triton_nvfp4 import moe as triton_moe

        tri = (triton_moe.prepare_moe(weights), triton_moe.fused_moe)
    kit_run = kit.prepare_moe(weights, ms, top_k) if kit is not None else None
    expert_bytes = 3 * inter * hidden * 4.5 / 8
    g = torch.Generator(device="cuda").manual_seed(0)
    for m in ms:
        if over_budget():
            record({"kind": "moe", "shape": list(shape), "m": m, "skipped": "budget"})
            continue
        touched = min(experts, m * top_k) * expert_bytes
        rotations = max(2, min(32, math.ceil(4 * info["l2_bytes"] / touched)))
        routes = [routing(m, experts, top_k, g) for _ in range(rotations)]
        xs = [torch.randn(m, hidden, dtype=torch.bfloat16, device="cuda") for _ in range(rotations)]
        out = humming.fused_moe(xs[0], prepared, *routes[0])
        ref = reference_moe(xs[0].float(), weights, *routes[0])  # fp32 ground truth
        err = rel_err(out, ref)
        x, (w, ids) = xs[0].clone(), (t.clone() for t in routes[0])
        graph_equal, graph_new = graph_checks(lambda: humming.fused_moe(x, prepared, w, ids),
                                              [x, w, ids], [xs[1], *routes[1]])
        us = graph_time_us([lambda x=x, r=r: humming.fused_moe(x, prepared, *r) for x, r in zip(xs, routes)])
        cell = {"kind": "moe", "shape": list(shape), "m": m, "humming_us": us, "rel_err": err,
                "within_tolerance": err < TOLERANCE, "graph_equal": graph_equal,
                "graph_new_inputs_equal": graph_new,
                "finite": bool(torch.isfinite(out).all()), "prepare_s": prepare_s,
                "compile_s": prepared.compile_s, "kernels": [prepared.w13.kernels, prepared.w2.kernels],
                "prepared_bytes": prepared.nbytes, "checkpoint_bytes": weights.nbytes}
        if kit_run is not None:
            ids32 = [r[1].int() for r in routes]
            cell["kit_rel_err"] = rel_err(kit_run(xs[0], routes[0][0], ids32[0]), ref)
            cell["kit_us"] = graph_time_us([lambda x=x, w=r[0], i=i: kit_run(x, w, i)
                                            for x, r, i in zip(xs, routes, ids32)])
            cell["humming_over_kit"] = us / cell["kit_us"]
        if tri is not None:
            state, run = tri
            cell["triton_rel_err"] = rel_err(run(xs[0], state, *routes[0]), ref)
            cell["triton_us"] = graph_time_us([lambda x=x, r=r: run(x, state, *r) for x, r in zip(xs, routes)])
        record(cell)
    del prepared, weights, tri, kit_run
    torch.cuda.empty_cache()


def check_dense(shape, ms, info, triton, kit, record, over_budget) -> None:
    n, k = shape
    if over_budget():
        return skip("dense", shape, ms, record)
    weight = random_nvfp4((), n, k, 1, seed=3)
    copies = max(2, min(16, math.ceil(4 * info["l2_bytes"] / (n * k * 4.5 / 8))))
    start = time.perf_counter()
    prepared = [humming.prepare_linear(weight)]
    prepare_s = time.perf_counter() - start
    prepared += [humming.prepare_linear(weight) for _ in range(copies - 1)]  # compiled: conversion only
    tri = None
    if triton:
        from quantoracle.backends.triton_nvfp4 import gemm as triton_gemm

        tri = ([triton_gemm.prepare_linear(weight) for _ in range(copies)], triton_gemm.linear)
    kit_runs = [kit.prepare_linear(weight, ms) for _ in range(copies)] if kit is not None else None
    for m in ms:
        if over_budget():
            record({"kind": "dense", "shape": [n, k], "m": m, "skipped": "budget"})
            continue
        xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
        out = humming.linear(xs[0], prepared[0])
        ref = reference_linear(xs[0].float(), weight)
        err = rel_err(out, ref)
        x = xs[0].clone()
        graph_equal, graph_new = graph_checks(lambda: humming.linear(x, prepared[0]), [x], [xs[1]])
        us = graph_time_us([lambda x=x, p=p: humming.linear(x, p) for x, p in zip(xs, prepared)])
        cell = {"kind": "dense", "shape": [n, k], "m": m, "humming_us": us, "rel_err": err,
                "within_tolerance": err < TOLERANCE, "graph_equal": graph_equal,
                "graph_new_inputs_equal": graph_new,
                "finite": bool(torch.isfinite(out).all()), "prepare_s": prepare_s,
                "compile_s": prepared[0].compile_s, "kernels": [prepared[0].gemm.kernels],
                "prepared_bytes": prepared[0].nbytes, "checkpoint_bytes": weight.nbytes}
        if kit_runs is not None:
            cell["kit_rel_err"] = rel_err(kit_runs[0](xs[0]), ref)
            cell["kit_us"] = graph_time_us([lambda x=x, run=run: run(x) for x, run in zip(xs, kit_runs)])
            cell["humming_over_kit"] = us / cell["kit_us"]
        if tri is not None:
            states, run = tri
            cell["triton_rel_err"] = rel_err(run(xs[0], states[0]), ref)
            cell["triton_us"] = graph_time_us([lambda x=x, p=p: run(x, p) for x, p in zip(xs, states)])
        record(cell)
    del prepared, weight, tri, kit_runs
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--budget-s", type=float, default=float("inf"))
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in MOE_SHAPES))
    parser.add_argument("--dense-shapes", default=";".join(f"{n}x{k}" for n, k in DENSE_SHAPES))
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--kit", default=None, help="the peers kit's humming folder (.peers/humming): "
                        "time its vLLM-driven Humming beside ours")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    moe_shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
    dense_shapes = [tuple(int(v) for v in s.split("x")) for s in args.dense_shapes.split(";") if s]
    ms = [int(v) for v in args.ms.split(",")]

    require_cuda("check_humming.py")
    import humming as humming_pkg

    kit = Kit(args.kit) if args.kit else None

    info = device_info()
    info["humming"] = humming_pkg.__version__
    began = time.perf_counter()
    cells: list[dict] = []

    def record(cell: dict) -> None:
        cells.append(cell)
        print({key: (round(v, 5) if isinstance(v, float) else v) for key, v in cell.items()}, flush=True)
        write_json(args.out, "check_humming.json", {"device": info, "tolerance": TOLERANCE, "cells": cells})

    def over_budget() -> bool:
        return time.perf_counter() - began > args.budget_s

    for shape in moe_shapes:
        check_moe(shape, ms, info, not args.no_triton, kit, record, over_budget)
    for shape in dense_shapes:
        check_dense(shape, ms, info, not args.no_triton, kit, record, over_budget)

    done = [c for c in cells if "skipped" not in c]
    rows = [[c["kind"], "x".join(map(str, c["shape"])), c["m"], c["humming_us"], c.get("kit_us", ""),
             c.get("humming_over_kit", ""), c.get("triton_us", ""), c["rel_err"], c.get("triton_rel_err", ""),
             c["graph_equal"] and c["graph_new_inputs_equal"], c["compile_s"]] for c in done]
    print(fmt_table(["kind", "shape", "M", "humming us", "kit us", "/kit", "triton us", "err", "triton err",
                     "graph ==", "compile s"], rows))
    worst = max((c["rel_err"] for c in done), default=float("nan"))
    bad = [c for c in done
           if not (c["within_tolerance"] and c["graph_equal"] and c["graph_new_inputs_equal"] and c["finite"])]
    print(f"cells {len(done)} of {len(cells)}, worst rel err {worst:.3e} (tolerance {TOLERANCE}), "
          f"failing {len(bad)}, {time.perf_counter() - began:.0f} s")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
