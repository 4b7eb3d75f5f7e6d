"""``quantoracle tune``: measure every candidate per batch size on this GPU; write a tuning cache."""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys

from quantoracle.cli.options import UsageError, add_json, add_quiet, show_progress
from quantoracle.oracle.spec import ACTIVATION_DTYPES
from quantoracle.oracle.tuning import LADDER, user_cache

HELP = "time every candidate per batch size on this GPU; write a tuning cache"

# The shapes of the performance tables (docs/performance.md): MoE E,H,I,top_k and dense NxK.
BENCHMARK_SHAPES = (
    "moe:256,2048,512,8", "moe:128,2048,768,8", "moe:8,4096,14336,2", "moe:256,7168,2048,8",
    "linear:4096x4096", "linear:28672x8192", "linear:7168x2048",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune", help=HELP,
        description="For each layer shape (of a checkpoint, or given with --shape), time every candidate "
                    "backend/variant that survives the rules at each token count of the ladder, on this "
                    "machine's GPU, and write the measurements as a tuning cache that plans rank by. Needs "
                    "a CUDA GPU.")
    parser.add_argument("checkpoint", nargs="?", default=None,
                        help="a quantized checkpoint directory: tune its distinct layer shapes "
                             "(default: the --shape list, else the benchmark shapes)")
    parser.add_argument("--shape", action="append", metavar="SHAPE",
                        help="a layer shape, repeatable: 'moe:E,H,I,TOPK' or 'linear:NxK' "
                             f"(default: {' '.join(BENCHMARK_SHAPES)})")
    parser.add_argument("--dtype", default="bfloat16", choices=ACTIVATION_DTYPES, help="activation dtype")
    parser.add_argument("--ladder", default=",".join(map(str, LADDER)), metavar="M,M,...",
                        help="token counts to time")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help=f"where to write the cache (default: {user_cache()}, read by every later answer)")
    parser.add_argument("--match", default="exact", choices=("exact", "capability"),
                        help="which answers the cache applies to: this exact device and software, or any "
                             "GPU of the same compute capability (what a shipped cache uses)")
    add_quiet(parser)
    add_json(parser, "a summary")
    parser.set_defaults(run=run)


def parse_shape(text: str, device, dtype: str):
    from quantoracle.oracle import Problem
    from quantoracle.schemes.scheme import W4A16_NVFP4

    moe = re.fullmatch(r"moe:(\d+),(\d+),(\d+),(\d+)", text.strip())
    linear = re.fullmatch(r"linear:(\d+)x(\d+)", text.strip())
    if moe:
        e, h, i, k = map(int, moe.groups())
        return Problem(kind="moe", scheme=W4A16_NVFP4, device=device, dtype=dtype, n=i, k=h, experts=e, top_k=k)
    if linear:
        n, k = map(int, linear.groups())
        return Problem(kind="linear", scheme=W4A16_NVFP4, device=device, dtype=dtype, n=n, k=k)
    raise UsageError(f"--shape {text!r}: write 'moe:E,H,I,TOPK' (e.g. moe:128,2048,768,8) or 'linear:NxK' "
                     "(e.g. linear:4096x4096)")


def run(args: argparse.Namespace) -> int:
    import torch

    from quantoracle.errors import DeviceError
    from quantoracle.oracle import Device
    from quantoracle.tune import tune

    if not torch.cuda.is_available():
        raise DeviceError(f"needs a CUDA GPU, and torch {torch.__version__} sees none")
    device = Device.of("cuda")
    try:
        ladder = sorted({int(m) for m in args.ladder.split(",")})
    except ValueError:
        raise UsageError(f"--ladder {args.ladder!r}: write token counts like 1,2,4,8") from None
    if not ladder or ladder[0] < 1:
        raise UsageError(f"--ladder {args.ladder!r}: token counts are >= 1")
    if args.checkpoint:
        from quantoracle.checkpoint_resolution import resolve_checkpoint

        result = resolve_checkpoint(args.checkpoint, device, dtype=args.dtype)
        problems = list(dict.fromkeys(g.outcome.effective_problem for g in result.groups if g.backend))
    else:
        problems = [parse_shape(s, device, args.dtype) for s in (args.shape or BENCHMARK_SHAPES)]
    command = "quantoracle " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "quantoracle tune"
    report = tune(problems, ladder=ladder, match=args.match, command=command, progress=show_progress(args))
    out = args.out or user_cache()
    report.cache.save(out)
    summary = {"out": str(out), "fingerprint": report.cache.fingerprint.model_dump(mode="json"),
               "measurements": len(report.cache.measurements), "prepare_s": report.prepare_s,
               "checks": len(report.checks), "checks_failed": sum(not c.passed for c in report.checks),
               "worst_error": {label: _finite(max(c.error for c in report.checks if c.label == label))
                               for label in dict.fromkeys(c.label for c in report.checks)},
               "failures": report.failures}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {len(report.cache.measurements)} measurements to {out} ({report.cache.fingerprint.describe()})")
        for label, seconds in report.prepare_s.items():
            print(f"  prepare (and compile) {label}: {seconds:.1f} s")
        for label, error in summary["worst_error"].items():
            worst = "NaN/Inf" if error is None else f"{error:.2e}"
            print(f"  numerics {label}: worst rel. error {worst} against reference over the Ms probed")
        for failure in report.failures:
            print(f"  failed, left unmeasured: {failure}")
    return 1 if report.failures else 0


def _finite(value: float) -> float | None:
    """JSON has no infinity: a non-finite error (NaN/Inf output) is written as null."""
    return value if math.isfinite(value) else None
