"""The Humming backend on a CUDA GPU at the benchmark shapes: correctness against the reference
backend (eager and under CUDA-graph capture), JIT-compile cost, and CUDA-graph timings beside
triton_nvfp4 and beside the peers kit's Humming (vLLM's way of driving it) on the same weights
and inputs, in one process.

For every MoE shape (E, H, I, k) and dense N x K, ``prepare`` (the whole of Humming's tuning
list compiled, as the plugin does) is timed, then for each M:

- per implementation (``humming``: this backend; ``kit``: with ``--kit DIR``, the peers kit's
  vLLM-driven Humming, its own align, activation and top-k sum, from the kit's ``humming``
  folder, ``.peers/humming``; ``triton``: triton_nvfp4 unless ``--no-triton``): ``{name}_rel_err``
  ``||y - y_ref|| / ||y_ref||`` against the reference backend (bf16 inputs), ``{name}_finite``,
  and ``{name}_us``; a step that raises is recorded as ``{name}_error`` and the run goes on;
- ``graph_equal``: a graph captured on one input, replayed, equals the eager call bit for bit;
- ``graph_new_inputs_equal``: after new inputs (and routings) are copied into the captured
  buffers and the captured output is poisoned with NaN, the replay equals an eager call on the
  new inputs bit for bit (what a serving engine does with a captured graph);
- the timings are ``_common.graph_time_us`` with rotating routings / inputs (MoE) or rotating
  weight copies (dense) so no call finds its weights in L2, the implementations one after the
  other on the same inputs; ``humming_over_kit`` is their ratio.

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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from _common import (
    Recorder, device_info, fmt_table, graph_checks, graph_time_us, random_moe, random_nvfp4, rel_err,
    require_cuda,
)
from quantoracle.backends.humming import TOLERANCE
from quantoracle.backends.humming import kernels as humming
from quantoracle.backends.reference.linear import linear as reference_linear
from quantoracle.backends.reference.moe import fused_moe as reference_moe
from quantoracle.schemes.tensors import MoEWeights, NVFP4Tensor

MOE_SHAPES = [(256, 2048, 512, 8), (128, 2048, 768, 8), (8, 4096, 14336, 2), (256, 7168, 2048, 8)]
DENSE_SHAPES = [(4096, 4096), (28672, 8192), (7168, 2048)]
MS = [1, 4, 16, 64, 256, 1024, 4096]
DEVICE = "cuda"


def routing(m: int, experts: int, top_k: int, g: torch.Generator):
    logits = torch.randn(m, experts, device=DEVICE, generator=g)
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
    weights = random_moe(experts, hidden, inter)
    gate_up = weights.gate_up
    shared = gate_up.global_scale[:, :1].expand(experts, 2).contiguous()
    return MoEWeights(NVFP4Tensor(gate_up.packed, gate_up.block_scale, shared), weights.down)


@dataclass
class Case:
    """One benchmark shape, prepared: ``runs`` maps each implementation to ``run(i, *args)``
    (``i``: the rotation, i.e. which weight copy for dense layers), ``inputs(m)`` gives the
    rotations' call arguments, ``reference(*args)`` the fp32 ground truth, ``facts`` what every
    cell records."""

    kind: str
    shape: list[int]
    runs: dict[str, Callable[..., torch.Tensor]]
    inputs: Callable[[int], list[tuple]]
    reference: Callable[..., torch.Tensor]
    facts: dict


def moe_case(shape, ms, info, triton, kit) -> Case:
    experts, hidden, inter, top_k = shape
    weights = moe_weights(experts, hidden, inter)
    start = time.perf_counter()
    prepared = humming.prepare_moe(weights)
    facts = {"prepare_s": time.perf_counter() - start, "compile_s": prepared.compile_s,
             "kernels": [prepared.w13.kernels, prepared.w2.kernels], "prepared_bytes": prepared.nbytes,
             "checkpoint_bytes": weights.nbytes}
    runs = {"humming": lambda i, x, w, ids, ids32: humming.fused_moe(x, prepared, w, ids)}
    prepare_optional(runs, facts, "kit", lambda: kit.prepare_moe(weights, ms, top_k), kit is not None,
                     lambda run: lambda i, x, w, ids, ids32: run(x, w, ids32))
    if triton:
        from quantoracle.backends.triton_nvfp4 import moe as triton_moe

        prepare_optional(runs, facts, "triton", lambda: triton_moe.prepare_moe(weights), True,
                         lambda state: lambda i, x, w, ids, ids32: triton_moe.fused_moe(x, state, w, ids))
    expert_bytes = 3 * inter * hidden * 4.5 / 8
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def inputs(m: int) -> list[tuple]:
        touched = min(experts, m * top_k) * expert_bytes
        rotations = max(2, min(32, math.ceil(4 * info["l2_bytes"] / touched)))
        out = []
        for _ in range(rotations):
            w, ids = routing(m, experts, top_k, g)
            out.append((torch.randn(m, hidden, dtype=torch.bfloat16, device=DEVICE), w, ids, ids.int()))
        return out

    return Case("moe", list(shape), runs, inputs,
                lambda x, w, ids, ids32: reference_moe(x.float(), weights, w, ids), facts)


def dense_case(shape, ms, info, triton, kit) -> Case:
    n, k = shape
    weight = random_nvfp4((), n, k, 1, seed=3)
    copies = max(2, min(16, math.ceil(4 * info["l2_bytes"] / (n * k * 4.5 / 8))))
    start = time.perf_counter()
    prepared = [humming.prepare_linear(weight)]
    facts = {"prepare_s": time.perf_counter() - start, "compile_s": prepared[0].compile_s,
             "kernels": [prepared[0].gemm.kernels], "prepared_bytes": prepared[0].nbytes,
             "checkpoint_bytes": weight.nbytes, "copies": copies}
    prepared += [humming.prepare_linear(weight) for _ in range(copies - 1)]  # compiled: conversion only
    runs = {"humming": lambda i, x: humming.linear(x, prepared[i])}
    prepare_optional(runs, facts, "kit", lambda: [kit.prepare_linear(weight, ms) for _ in range(copies)],
                     kit is not None, lambda kit_runs: lambda i, x: kit_runs[i](x))
    if triton:
        from quantoracle.backends.triton_nvfp4 import gemm as triton_gemm

        prepare_optional(runs, facts, "triton", lambda: [triton_gemm.prepare_linear(weight) for _ in range(copies)],
                         True, lambda states: lambda i, x: triton_gemm.linear(x, states[i]))
    return Case("dense", [n, k], runs,
                lambda m: [(torch.randn(m, k, dtype=torch.bfloat16, device=DEVICE),) for _ in range(copies)],
                lambda x: reference_linear(x.float(), weight), facts)


def prepare_optional(runs, facts, name, prepare, wanted, wrap) -> None:
    """Add implementation ``name`` (``wrap(prepare())``) to ``runs`` when ``wanted``; a failed
    prepare is recorded in ``facts`` (``{name}_error``), not raised."""
    if not wanted:
        return
    try:
        runs[name] = wrap(prepare())
    except Exception as error:  # a peer that cannot be prepared must not end the run
        facts[f"{name}_error"] = f"prepare: {type(error).__name__}: {error}"[:500]


def check_cell(case: Case, m: int) -> dict:
    """One M of a case: every implementation checked against the reference and timed; the graph
    checks for ``humming``. A step that raises is recorded as ``{name}_error`` and the run goes on."""
    cell = {"kind": case.kind, "shape": case.shape, "m": m, **case.facts}
    rotations = case.inputs(m)
    ref = case.reference(*rotations[0])
    for name, run in case.runs.items():
        step = "call"
        try:
            out = run(0, *rotations[0])
            cell[f"{name}_rel_err"] = rel_err(out, ref)
            cell[f"{name}_finite"] = bool(torch.isfinite(out).all())
            if name == "humming":
                step = "graph"
                buffers = [t.clone() for t in rotations[0]]
                cell["graph_equal"], cell["graph_new_inputs_equal"] = graph_checks(
                    lambda: run(0, *buffers), buffers, list(rotations[1]))
            step = "timing"
            cell[f"{name}_us"] = graph_time_us([lambda i=i, args=args: run(i, *args)
                                                for i, args in enumerate(rotations)])
        except Exception as error:
            cell[f"{name}_error"] = f"{step}: {type(error).__name__}: {error}"[:500]
    if "humming_us" in cell and "kit_us" in cell:
        cell["humming_over_kit"] = cell["humming_us"] / cell["kit_us"]
    cell["within_tolerance"] = cell.get("humming_rel_err", float("inf")) < TOLERANCE
    return cell


def passed(cell: dict) -> bool:
    return bool(cell["within_tolerance"] and cell.get("humming_finite") and cell.get("graph_equal")
                and cell.get("graph_new_inputs_equal") and "humming_error" not in cell)


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

    info = device_info()
    info["humming"] = humming_pkg.__version__
    kit = None
    if args.kit:
        try:
            kit = Kit(args.kit)
        except Exception as error:  # no kit column, but the backend's own checks still run
            info["kit_error"] = f"{type(error).__name__}: {error}"[:500]
            print("kit not loaded:", info["kit_error"], flush=True)
    run = Recorder(args.out, "check_humming.json", args.budget_s, device=info, tolerance=TOLERANCE)
    record, over_budget, cells = run.record, run.over_budget, run.cells

    for make, shapes, kind in ((moe_case, moe_shapes, "moe"), (dense_case, dense_shapes, "dense")):
        for shape in shapes:
            if over_budget():
                record({"kind": kind, "shape": list(shape), "skipped": "budget"})
                continue
            try:
                case = make(shape, ms, info, not args.no_triton, kit)
            except Exception as error:  # e.g. the shape's compile failed: record it, go on
                record({"kind": kind, "shape": list(shape), "error": f"prepare: {type(error).__name__}: {error}"[:500]})
                continue
            for m in ms:
                if over_budget():
                    record({"kind": kind, "shape": list(shape), "m": m, "skipped": "budget"})
                    continue
                try:
                    record(check_cell(case, m))
                except Exception as error:  # inputs or reference: record it, go on
                    record({"kind": kind, "shape": list(shape), "m": m,
                            "error": f"cell: {type(error).__name__}: {error}"[:500]})
            del case
            torch.cuda.empty_cache()

    done = [c for c in cells if "skipped" not in c and "m" in c and "error" not in c]
    rows = [[c["kind"], "x".join(map(str, c["shape"])), c["m"], c.get("humming_us", ""), c.get("kit_us", ""),
             c.get("humming_over_kit", ""), c.get("triton_us", ""), c.get("humming_rel_err", ""),
             c.get("triton_rel_err", ""), bool(c.get("graph_equal") and c.get("graph_new_inputs_equal")),
             c["compile_s"]] for c in done]
    print(fmt_table(["kind", "shape", "M", "humming us", "kit us", "/kit", "triton us", "err", "triton err",
                     "graph ==", "compile s"], rows))
    worst = max((c.get("humming_rel_err", float("nan")) for c in done), default=float("nan"))
    bad = [c for c in cells if "skipped" not in c and not ("m" in c and "error" not in c and passed(c))]
    print(f"cells {len(done)} of {len(cells)}, worst rel err {worst:.3e} (tolerance {TOLERANCE}), "
          f"failing {len(bad)}, {run.elapsed():.0f} s")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
