"""``quantoracle matrix``: every named scheme x layer kind on one device -> backend, or why none."""

from __future__ import annotations

import argparse
import json

from quantoracle.cli.backends import provided_by
from quantoracle.cli.options import add_json, add_oracle_options, oracle_device, oracle_options, positive_int
from quantoracle._version import __version__
from quantoracle.oracle import default_registry
from quantoracle.report import table

HELP = "every scheme x layer kind -> backend, or why none"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "matrix", help=HELP, description="Resolve every named scheme for a Linear and a MoE layer at representative "
                    "shapes, and show the backend chosen or each backend's failed rule codes.")
    add_oracle_options(parser)
    parser.add_argument("--tokens", type=positive_int, default=None, metavar="M",
                        help="resolve for a batch of M tokens (default: any batch size)")
    add_json(parser, "the rows")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from quantoracle.matrix import matrix

    chosen = oracle_device(args.device)
    options = oracle_options(args)
    rows = matrix(chosen.device, args.dtype, options.pop("activation_fallback"), tokens=args.tokens, **options)
    if args.json:
        print(json.dumps({
            "quantoracle": __version__, "device": str(chosen.device), "device_source": chosen.source,
            "dtype": args.dtype, "activation_fallback": args.activation_fallback, "tokens": args.tokens, "rows": rows,
            "backends": {name: provided_by(name) for name in default_registry().backends},
        }, indent=2))
        return 0
    out = []
    for r in rows:
        backend = (r["backend"] + (f"/{r['variant']}" if r["variant"] else "")) if r["backend"] else "NONE"
        if r["fallback"]:
            backend += f" ({r['fallback']})"
        why = _codes(r["asked_rejections"])
        if r["fallback"] and r["rejections"]:
            why += f" | served as {r['served_scheme']}: {_codes(r['rejections'])}"
        elif r["backend"]:
            why = _codes(r["rejections"])
        out.append([r["scheme"], r["kind"], backend, why])
    tokens = "any batch size" if args.tokens is None else f"{args.tokens} tokens"
    print(f"device {chosen}, activations {args.dtype}, {tokens}, activation_fallback={args.activation_fallback}")
    print(table(["scheme", "layer", "backend", "rejected (rule codes; as asked first)"], out))
    return 0


def _codes(rejections: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}: {','.join(codes)}" for name, codes in rejections.items())

