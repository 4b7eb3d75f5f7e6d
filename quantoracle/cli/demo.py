"""``quantoracle demo``: a toy NVFP4 MoE model written, resolved, run and compared with bf16."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quantoracle.cli.options import TORCH_DEVICES, add_json, add_quiet, show_progress, torch_device
from quantoracle.report import table
from quantoracle.verify import VERIFY_POLICIES

HELP = "write a small NVFP4 MoE checkpoint, resolve and run it, compare with bf16"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help=HELP,
        description="Build a small bf16 MoE model, write it as ModelOpt NVFP4 checkpoints (W4A16 and "
                    "W4A4) to a temporary directory, read them back, resolve every layer on this "
                    "machine, run them and compare with the bf16 model. No network.")
    parser.add_argument("--device", default=None,
                        help=f"torch device to run on: {TORCH_DEVICES} (default: cuda if present, else cpu)")
    add_json(parser, "the report")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="also write the JSON report to FILE (its directory is created if missing)")
    parser.add_argument("--verify", default=None, choices=VERIFY_POLICIES,
                        help="numerics check of each layer's backend against reference when it is built "
                             "(default: $QUANTORACLE_VERIFY, else first_use; docs/trust.md)")
    add_quiet(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from quantoracle import demo

    device = torch_device(args.device)
    out = Path(args.out) if args.out else None
    if out is not None:  # before the run: a bad destination should not cost the whole demo
        out.parent.mkdir(parents=True, exist_ok=True)
    report = demo.run(device=device, progress=show_progress(args) and not args.json, verify=args.verify)
    if out is not None:
        out.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    cfg = report["config"]
    print(f"\ntoy MoE model: {cfg['layers']} layers, {cfg['experts']} experts (top-{cfg['top_k']}), "
          f"hidden {cfg['hidden']}, intermediate {cfg['intermediate']}, {cfg['tokens']} tokens; "
          f"device {report['device']}, activations {report['dtype']}")
    for variant in report["variants"]:
        print(f"\n{variant['checkpoint']} checkpoint, activation_fallback={variant['activation_fallback']}:")
        rows: dict[tuple, list[str]] = {}
        for layer in variant["layers"]:
            kind = "moe" if layer["name"].endswith("experts") else "linear"
            key = (kind, layer["scheme"], layer["backend"], layer["fallback"] or "-")
            rows.setdefault(key, []).append(layer["name"])
        print(table(["layer", "scheme", "backend", "fallback", "modules"],
                    [[*key, f"{len(names)} ({names[0]}, ...)" if len(names) > 1 else names[0]]
                     for key, names in rows.items()]))
    print()
    forward = f"forward ms ({report['timing']['statistic']} of {report['timing']['runs']})"
    print(table(["checkpoint", "activation_fallback", "rel. error vs bf16 model", forward, "weight MiB"], [
        [v["checkpoint"], v["activation_fallback"], f"{v['rel_error']:.2%}", f"{v['ms']:.2f}",
         f"{v['weight_bytes'] / 2**20:.2f}"] for v in report["variants"]
    ] + [["bf16 (float32 math)", "-", "0", f"{report['float_ms']:.2f}", f"{report['float_weight_bytes'] / 2**20:.2f}"]]))
    print(f"\nNVFP4 weights alone differ from the bf16 ones by {report['weight_rel_error']:.2%} (relative RMS): "
          "that is the format's own error on these random weights; the model error above follows from it.")
    if out is not None:
        print(f"wrote {out}")
    return 0
