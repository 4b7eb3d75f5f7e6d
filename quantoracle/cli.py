"""``quantoracle``: demo | resolve | backends | matrix | quantize | bench."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from quantoracle.errors import QuantoracleError
from quantoracle.oracle import Device, default_registry
from quantoracle.oracle.engine import FALLBACKS
from quantoracle.oracle.spec import ACTIVATION_DTYPES
from quantoracle.report import table
from quantoracle.schemes.scheme import Scheme


def _device(text: str | None) -> Device:
    return Device.current() if text in (None, "current") else Device.parse(text)


def cmd_backends(args: argparse.Namespace) -> int:
    backends = default_registry().backends
    if args.json:
        print(json.dumps([b.spec.model_dump(mode="json") for b in backends.values()], indent=2))
        return 0
    rows = []
    for b in sorted(backends.values(), key=lambda b: (-b.spec.priority, b.spec.name)):
        s = b.spec
        cap = ""
        if s.min_capability or s.max_capability:
            fmt = lambda c: f"sm{c[0]}{c[1]}" if c else ""  # noqa: E731
            cap = f" {fmt(s.min_capability)}..{fmt(s.max_capability)}"
        schemes = ", ".join(
            (f"{x.weight.dtype}+any" if x.activation == "any" else Scheme(weight=x.weight, activation=x.activation).name)
            + (" (emulated)" if x.emulated else "")
            for x in s.schemes
        )
        rows.append([
            s.name, s.priority, "+".join(sorted(s.layer_kinds)), schemes,
            ",".join(sorted(s.platforms)) + cap, ",".join(sorted(s.dtypes)),
            f"n%{s.n_multiple_of} k%{s.k_multiple_of}", ",".join(sorted(s.moe_activations)),
            ("tp" if s.tensor_parallel else "") + ("+ep" if s.expert_parallel else ""),
            ",".join(s.requires) or "-",
        ])
    print(table(["backend", "prio", "layers", "schemes", "devices", "dtypes", "shape",
                 "moe act", "parallel", "requires"], rows))
    for b in backends.values():
        if b.spec.description:
            print(f"  {b.spec.name}: {b.spec.description}")
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    from quantoracle.matrix import matrix

    device = _device(args.device)
    rows = matrix(device, args.dtype, args.activation_fallback)
    if args.json:
        print(json.dumps({"device": str(device), "dtype": args.dtype, "rows": rows}, indent=2))
        return 0
    out = []
    for r in rows:
        why = "; ".join(f"{n}: {','.join(codes)}" for n, codes in r["rejections"].items())
        chosen = r["backend"] or "NONE"
        if r["fallback"]:
            chosen += f" ({r['fallback']})"
        out.append([r["scheme"], r["kind"], chosen, why])
    print(f"device {device}, activations {args.dtype}, activation_fallback={args.activation_fallback}")
    print(table(["scheme", "layer", "backend", "rejected (rule codes)"], out))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import os
    import platform

    from quantoracle.matrix import time_resolve

    result = time_resolve(rounds=args.rounds)
    result.update(machine=platform.processor() or platform.machine(), python=platform.python_version())
    print(table(["problems", "backends", "cold median us", "cold p90 us", "cached median us", "cached p90 us"], [[
        result["problems"], result["backends"], f"{result['cold_us_median']:.1f}",
        f"{result['cold_us_p90']:.1f}", f"{result['cached_us_median']:.2f}", f"{result['cached_us_p90']:.2f}",
    ]]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "resolve.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    from quantoracle.checkpoint_resolution import describe_force, parse_force, resolve_checkpoint

    force = parse_force(args.force)
    result = resolve_checkpoint(
        args.path, _device(args.device), dtype=args.dtype, top_k=args.top_k,
        override_activation=args.override_activation, activation_fallback=args.activation_fallback,
        force=force, exclude=tuple(args.exclude or ()),
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 1 if result.unserved else 0
    print(f"checkpoint {result.directory}: device {result.device}, activations {args.dtype}, "
          f"top-k {result.top_k} ({result.top_k_source}), activation_fallback={args.activation_fallback}, "
          f"override_activation={args.override_activation or 'none given'}, force={describe_force(force)}")
    rows = []
    for g in result.groups:
        p = g.problem
        shape = f"n={p.n} k={p.k}" if p.kind == "linear" else f"E={p.experts} H={p.k} I={p.n} top{p.top_k}"
        names = g.names[0] if len(g.names) == 1 else f"{len(g.names)} layers ({g.names[0]}, ...)"
        fallback = getattr(g.outcome, "fallback", None) or "-"
        rows.append([names, p.kind, shape, p.scheme.name, g.backend or "NONE", fallback])
    print(table(["layers", "kind", "shape", "scheme", "backend", "fallback"], rows))
    for g in result.groups:
        print(f"\n{g.names[0]}{f' and {len(g.names) - 1} more' if len(g.names) > 1 else ''}:")
        print(str(g.outcome) if g.backend is None else g.outcome.explain())
    return 1 if result.unserved else 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from quantoracle.schemes.checkpoint import DEFAULT_EXCLUDE, quantize_checkpoint

    amax = None
    if args.input_amax:
        with open(args.input_amax) as f:
            amax = json.load(f)
    path = quantize_checkpoint(
        args.src, args.dst, args.scheme, format=args.format,
        exclude=tuple(args.exclude) if args.exclude else DEFAULT_EXCLUDE, input_amax=amax,
    )
    print(f"wrote {args.format} {args.scheme} checkpoint to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from quantoracle import demo

    report = demo.run(device=None if args.device is None else _torch_device(args.device), progress=not args.json)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    cfg = report["config"]
    print(f"\ntoy MoE model: {cfg['layers']} layers, {cfg['experts']} experts (top-{cfg['top_k']}), "
          f"hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, {cfg['tokens']} tokens; "
          f"device {report['device']}, activations {report['dtype']}")
    for variant in report["variants"]:
        print(f"\n{variant['checkpoint']} checkpoint, activation_fallback={variant['activation_fallback']}:")
        rows = {}
        for layer in variant["layers"]:
            kind = "moe" if layer["name"].endswith("experts") else "linear"
            key = (kind, layer["scheme"], layer["backend"], layer["fallback"] or "-")
            rows.setdefault(key, []).append(layer["name"])
        print(table(["layer", "scheme", "backend", "fallback", "modules"],
                    [[*key, f"{len(names)} ({names[0]}, ...)" if len(names) > 1 else names[0]]
                     for key, names in rows.items()]))
    print()
    print(table(["checkpoint", "activation_fallback", "rel. error vs bf16 model", "forward ms", "weight MiB"], [
        [v["checkpoint"], v["activation_fallback"], f"{v['rel_error']:.2%}", f"{v['ms']:.2f}",
         f"{v['weight_bytes'] / 2**20:.2f}"] for v in report["variants"]
    ] + [["bf16 (float32 math)", "-", "0", f"{report['float_ms']:.2f}", f"{report['float_weight_bytes'] / 2**20:.2f}"]]))
    print(f"\nNVFP4 weights alone differ from the bf16 ones by {report['weight_rel_error']:.2%} (relative RMS): "
          "that is the format's own error on these random weights; the model error above follows from it.")
    return 0


def _torch_device(text: str):
    import torch

    return torch.device(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantoracle", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backends", help="every registered backend and its rules")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_backends)

    p = sub.add_parser("matrix", help="every scheme x layer kind -> backend, or why none")
    p.add_argument("--device", default=None, help="cpu, sm80, sm90, sm100, ... (default: this machine)")
    p.add_argument("--dtype", default="bfloat16", choices=ACTIVATION_DTYPES)
    p.add_argument("--activation-fallback", default="weight_only", choices=FALLBACKS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_matrix)

    p = sub.add_parser("resolve", help="resolve every quantized layer of a checkpoint directory")
    p.add_argument("path")
    p.add_argument("--device", default=None, help="cpu, sm80, sm90, sm100, ... (default: this machine)")
    p.add_argument("--dtype", default="bfloat16", choices=ACTIVATION_DTYPES)
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: config.json)")
    p.add_argument("--override-activation", default=None, choices=["none"],
                   help="'none' serves a W4A4 checkpoint weight-only")
    p.add_argument("--activation-fallback", default="weight_only", choices=FALLBACKS)
    p.add_argument("--force", action="append", metavar="BACKEND|GLOB=BACKEND",
                   help="one backend for every layer, or per layer-name glob (repeatable)")
    p.add_argument("--exclude", action="append", metavar="BACKEND")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_resolve)

    p = sub.add_parser("quantize", help="quantize a 16-bit safetensors model directory to NVFP4")
    p.add_argument("src", help="a transformers model directory (config.json + *.safetensors)")
    p.add_argument("dst", help="the new checkpoint directory (must not exist or be empty)")
    p.add_argument("--scheme", default="w4a16_nvfp4", choices=["w4a16_nvfp4", "w4a4_nvfp4"])
    p.add_argument("--format", default="modelopt", choices=["modelopt", "compressed-tensors"])
    p.add_argument("--exclude", action="append", metavar="GLOB", help="modules kept 16-bit (repeatable)")
    p.add_argument("--input-amax", metavar="JSON",
                   help="W4A4: a JSON object, module name -> calibrated max |input|")
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("demo", help="write a small NVFP4 MoE checkpoint, resolve and run it, compare with bf16")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if present)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("bench", help="time resolve over the full matrix (cold and cached)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="directory for resolve.json")
    p.set_defaults(run=cmd_bench)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (QuantoracleError, ValueError, FileExistsError) as err:
        print(f"quantoracle {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
