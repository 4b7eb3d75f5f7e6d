"""``quantoracle resolve PATH``: every quantized layer of a checkpoint directory, resolved and
explained."""

from __future__ import annotations

import argparse
import json

from quantoracle.cli.options import add_json, add_oracle_options, oracle_device
from quantoracle.report import table

HELP = "resolve every quantized layer of a checkpoint directory"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "resolve", help=HELP,
        description="Read a quantized checkpoint directory (ModelOpt or compressed-tensors), resolve "
                    "every quantized layer on a device, and explain each choice. Layers that resolve "
                    "identically are grouped. Exit code 1 when some layer has no backend.")
    parser.add_argument("path", help="a quantized checkpoint directory on this machine")
    add_oracle_options(parser)
    parser.add_argument("--top-k", type=int, default=None,
                        help="experts per token (default: config.json's num_experts_per_tok)")
    parser.add_argument("--override-activation", default=None, choices=["none"],
                        help="'none' serves a W4A4 checkpoint weight-only")
    parser.add_argument("--force", action="append", metavar="BACKEND|GLOB=BACKEND",
                        help="one backend for every layer, or per layer-name glob (repeatable); "
                             "default: $QUANTORACLE_BACKEND if set")
    parser.add_argument("--exclude", action="append", metavar="BACKEND",
                        help="never choose this backend (repeatable)")
    add_json(parser, "the resolution")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from quantoracle.checkpoint_resolution import describe_force, parse_force, resolve_checkpoint

    force = parse_force(args.force)
    chosen = oracle_device(args.device)
    result = resolve_checkpoint(
        args.path, chosen.device, dtype=args.dtype, top_k=args.top_k,
        override_activation=args.override_activation, activation_fallback=args.activation_fallback,
        force=force, exclude=tuple(args.exclude or ()),
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 1 if result.unserved else 0
    print(f"checkpoint {result.directory}: device {chosen}, activations {args.dtype}, "
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
