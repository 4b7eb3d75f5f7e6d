"""Plans on the GPU: tune, then check that each layer's plan serves every token count with the
fastest measured candidate, that dispatching per call costs nothing measurable, and what the
numerics check on first use costs per layer.

    python3 benchmarks/bench_plan.py --out DIR [--shapes moe:E,H,I,K linear:NxK ...] [--ladder 1,2,4,...]

1. ``quantoracle.tune`` over the shapes (every surviving candidate: triton_nvfp4's variants,
   humming where installed) -> ``DIR/tuning.json`` (match="capability", what the shipped cache
   uses).
2. Per shape, with that cache: the plan under ``layouts="fastest"`` and ``"one"``; for each
   ladder M, the plan's candidate and every candidate's measured µs (from the cache).
3. Per shape and a few M, the layer itself (``NVFP4Linear`` / ``NVFP4FusedMoE`` built with the
   cache, per-call dispatch) timed with the same method, next to the measurement of the
   candidate its plan chose: the dispatch overhead.
4. Per shape, the seconds of the numerics check (``verify="first_use"``) at construction and
   its verdicts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _common import device_info, fmt_table, require_cuda, write_json  # noqa: E402

import torch  # noqa: E402

from quantoracle.cli.tune import BENCHMARK_SHAPES, parse_shape  # noqa: E402
from quantoracle.layers import NVFP4FusedMoE, NVFP4Linear  # noqa: E402
from quantoracle.oracle import Device, plan  # noqa: E402
from quantoracle.oracle.tuning import LADDER  # noqa: E402
from quantoracle.timing import graph_time_us  # noqa: E402
from quantoracle.tune import random_weights, tune  # noqa: E402

LAYER_MS = (1, 16, 256, 4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="*", default=list(BENCHMARK_SHAPES))
    parser.add_argument("--ladder", default=",".join(map(str, LADDER)))
    parser.add_argument("--layer-ms", default=",".join(map(str, LAYER_MS)))
    parser.add_argument("--tuning", default=None, metavar="PATH",
                        help="use this tuning cache instead of tuning first (steps 2-4 only)")
    args = parser.parse_args()
    require_cuda("bench_plan")
    device = Device.of("cuda")
    ladder = [int(m) for m in args.ladder.split(",")]
    problems = [parse_shape(s, device, "bfloat16") for s in args.shapes]
    result = {"device": device_info(), "shapes": args.shapes, "ladder": ladder}

    start = time.time()
    cache_path = args.tuning or os.path.join(args.out, "tuning.json")
    os.makedirs(args.out, exist_ok=True)
    measured, result["prepare_s"], result["failures"] = [], {}, []
    for shape, problem in zip(args.shapes, problems) if args.tuning is None else ():  # saved shape by shape: a cut-off run keeps what it measured
        report = tune([problem], ladder=ladder, match="capability", progress=False,
                      command="python3 benchmarks/bench_plan.py " + " ".join(sys.argv[1:]))
        measured += report.cache.measurements
        report.cache.model_copy(update={"measurements": tuple(measured)}).save(cache_path)
        result["prepare_s"][shape], result["failures"] = report.prepare_s, result["failures"] + report.failures
        print(f"tune {shape}: {len(report.cache.measurements)} measurements, prepare {report.prepare_s}, "
              f"{time.time() - start:.0f} s so far; failures: {report.failures}", flush=True)
    result["tune_s"] = round(time.time() - start, 1)

    result["plans"] = {}
    for shape, problem in zip(args.shapes, problems):
        rows = []
        for policy in ("fastest", "one"):
            p = plan(problem, layouts=policy, tuning=cache_path)
            for m in ladder:
                res = p.at(m)
                costs = res.decided_by.costs if res.decided_by else {}
                best = min(costs, key=costs.get) if costs else None
                rows.append({"policy": policy, "M": m, "choice": res.label, "costs": costs, "best": best,
                             "choice_us": costs.get(res.label)})
            result["plans"].setdefault(shape, {})[policy] = {"buckets": p.to_list(), "rows": rows[-len(ladder):]}
        table = [[r["M"], r["choice"], r["choice_us"], r["best"], " ".join(f"{c}={u}" for c, u in sorted(r["costs"].items()))]
                 for r in result["plans"][shape]["fastest"]["rows"]]
        print(f"\n{shape} (layouts=fastest)")
        print(fmt_table(["M", "plan", "us", "fastest", "measured"], table))
        print("layouts=one:", [(b["min_tokens"], b["max_tokens"], b["backend"], b["variant"])
                               for b in result["plans"][shape]["one"]["buckets"]])
        write_json(args.out, "bench_plan.json", result)

    layer_ms = [int(m) for m in args.layer_ms.split(",")]
    result["layers"] = {}
    for shape, problem in zip(args.shapes, problems):
        cell = result["layers"][shape] = {}
        try:
            torch.cuda.synchronize()
            built = time.time()
            layer, weights = _layer(problem, cache_path)
            torch.cuda.synchronize()
            cell["build_s"] = round(time.time() - built, 2)
            cell["verification"] = [c.describe() for c in layer.verification]
            cell["verify_s"] = round(sum(c.seconds for c in layer.verification), 3)
            cell["plan"] = layer.plan.to_list()
            cell["prepared_bytes"] = layer.prepared_bytes
            cell["weight_bytes"] = weights.nbytes
            cell["us"] = {}
            for m in layer_ms:
                cell["us"][m] = round(_time_layer(layer, problem, m), 2)
            print(f"{shape}: build {cell['build_s']} s, verify {cell['verify_s']} s {cell['verification']}; "
                  f"layer us {cell['us']}; held {cell['prepared_bytes']} (at rest {cell['weight_bytes']})")
        except Exception as err:  # report and go on: one shape must not hide the others
            cell["error"] = f"{type(err).__name__}: {str(err)[:500]}"
            print(f"{shape}: {cell['error']}")
        write_json(args.out, "bench_plan.json", result)
        del cell
        torch.cuda.empty_cache()


def _layer(problem, cache_path):
    w = random_weights(problem)  # the weights tune times (the benchmark shapes are unsharded)
    if problem.kind == "linear":
        return NVFP4Linear(w, tuning=cache_path, layouts="fastest", verify="first_use"), w
    return NVFP4FusedMoE(w, top_k=problem.top_k, tuning=cache_path, layouts="fastest", verify="first_use"), w


def _time_layer(layer, problem, m: int) -> float:
    gen = torch.Generator(device="cuda").manual_seed(m)
    if problem.kind == "linear":
        xs = [torch.randn(m, problem.k, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2)]
        return graph_time_us([lambda x=x: layer(x) for x in xs], target_s=0.1, max_reps=30)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    touched = min(problem.experts, m * problem.top_k) * 3 * problem.k * problem.n * 4.5 / 8
    calls = []
    for _ in range(max(2, min(32, math.ceil(4 * l2 / touched)))):
        x = torch.randn(m, problem.k, device="cuda", dtype=torch.bfloat16, generator=gen)
        ids = torch.rand(m, problem.experts, device="cuda", generator=gen).topk(problem.top_k, dim=-1).indices
        w = torch.softmax(torch.randn(m, problem.top_k, device="cuda", generator=gen), dim=-1)
        calls.append(lambda x=x, w=w, ids=ids: layer.forward_routed(x, w, ids))
    return graph_time_us(calls, target_s=0.1, max_reps=30)


if __name__ == "__main__":
    main()
    print(json.dumps({"done": True}))
