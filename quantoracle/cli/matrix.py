"""``quantoracle matrix``: every named scheme x layer kind on one device -> backend, or why none."""

from __future__ import annotations

import argparse
import json

from quantoracle.cli.options import add_json, add_oracle_options, oracle_device
from quantoracle.report import table

HELP = "every scheme x layer kind -> backend, or why none"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "matrix", help=HELP, description="Resolve every named scheme for a Linear and a MoE layer at representative "
                    "shapes, and show the backend chosen or each backend's failed rule codes.")
    add_oracle_options(parser)
    add_json(parser, "the rows")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from quantoracle.matrix import matrix

    chosen = oracle_device(args.device)
    rows = matrix(chosen.device, args.dtype, args.activation_fallback)
    if args.json:
        print(json.dumps({"device": str(chosen.device), "device_source": chosen.source, "dtype": args.dtype,
                          "activation_fallback": args.activation_fallback, "rows": rows}, indent=2))
        return 0
    out = []
    for r in rows:
        why = "; ".join(f"{n}: {','.join(codes)}" for n, codes in r["rejections"].items())
        backend = r["backend"] or "NONE"
        if r["fallback"]:
            backend += f" ({r['fallback']})"
        out.append([r["scheme"], r["kind"], backend, why])
    print(f"device {chosen}, activations {args.dtype}, activation_fallback={args.activation_fallback}")
    print(table(["scheme", "layer", "backend", "rejected (rule codes)"], out))
    return 0
