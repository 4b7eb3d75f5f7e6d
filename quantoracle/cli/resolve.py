"""``quantoracle resolve PATH``: every quantized layer of a checkpoint directory, resolved and
explained."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from quantoracle._version import __version__
from quantoracle.cli.options import (
    DeviceChoice,
    UsageError,
    add_json,
    add_oracle_options,
    oracle_device,
    oracle_options,
    positive_int,
)
from quantoracle.oracle import ForcedBackendError
from quantoracle.oracle.engine import ENV_BACKEND, Force, force_for_layer
from quantoracle.report import table

if TYPE_CHECKING:
    from quantoracle.checkpoint_resolution import CheckpointResolution, LayerGroup

HELP = "resolve every quantized layer of a checkpoint directory"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "resolve", help=HELP,
        description="Read a quantized checkpoint directory (ModelOpt or compressed-tensors), resolve "
                    "every quantized layer on a device, and explain each choice. Layers that resolve "
                    "identically are grouped. Exit code 1 when some layer has no backend.")
    parser.add_argument("path", help="a quantized checkpoint directory on this machine")
    add_oracle_options(parser)
    parser.add_argument("--top-k", type=positive_int, default=None,
                        help="experts per token (default: config.json's num_experts_per_tok, else 8)")
    parser.add_argument("--override-activation", default=None, choices=["none"],
                        help="'none' serves a W4A4 checkpoint weight-only (default: the checkpoint's scheme)")
    parser.add_argument("--force", action="append", metavar="BACKEND|GLOB=BACKEND",
                        help=f"one backend for every layer, or per layer-name glob (repeatable); layers "
                             f"it does not name follow ${ENV_BACKEND} if set (default: none)")
    parser.add_argument("--exclude", action="append", metavar="BACKEND",
                        help="never choose this backend (repeatable)")
    parser.add_argument("--layers", action="store_true",
                        help="list every layer of each group (default: the first and a count)")
    add_json(parser, "the resolution (every layer name included)")
    parser.set_defaults(run=run)


def parse_force(values: list[str] | None) -> Force:
    """``--force BACKEND`` or repeated ``--force GLOB=BACKEND``."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    pairs: dict[str, str] = {}
    for value in values:
        glob, sep, backend = value.partition("=")
        if not sep or not glob or not backend:
            raise UsageError(f"--force {value!r}: write BACKEND (once), or GLOB=BACKEND per layer-name pattern")
        pairs[glob] = backend
    return pairs


def describe_force(force: Force, env_force: str | None) -> str:
    """``none``, ``reference``, ``*.experts=reference``, with ``$QUANTORACLE_BACKEND``'s part."""
    env = f"{env_force} (from ${ENV_BACKEND})" if env_force else None
    if isinstance(force, str):
        return force
    if force is None:
        return env or "none"
    given = ", ".join(f"{glob}={backend}" for glob, backend in force.items())
    return given + (f"; other layers {env}" if env else "")


def run(args: argparse.Namespace) -> int:
    from quantoracle.checkpoint_resolution import resolve_checkpoint

    force = parse_force(args.force)
    chosen = oracle_device(args.device)
    result = resolve_checkpoint(
        args.path, chosen.device, dtype=args.dtype, top_k=args.top_k,
        override_activation=args.override_activation, force=force, exclude=tuple(args.exclude or ()),
        **oracle_options(args),
    )
    if args.json:
        print(json.dumps(to_json(result, chosen), indent=2))
    else:
        print_text(result, chosen, list_layers=args.layers)
    return 1 if result.unserved else 0


def to_json(result: CheckpointResolution, chosen: DeviceChoice) -> dict[str, Any]:
    """The resolution's dict with the quantoracle version first and how the device was chosen."""
    data: dict[str, Any] = {"quantoracle": __version__}
    for key, value in result.to_dict().items():
        data[key] = value
        if key == "device":
            data["device_source"] = chosen.source
    return data


def print_text(result: CheckpointResolution, chosen: DeviceChoice, list_layers: bool) -> None:
    print(f"checkpoint {result.directory} ({result.format}, {result.config_file})")
    print(f"device {chosen}; activations {result.dtype}; top-k {result.top_k} ({result.top_k_source}); "
          f"activation_fallback={result.activation_fallback}; "
          f"override_activation={result.override_activation or 'none given'}; "
          f"force={describe_force(result.force, result.env_force)}; exclude={','.join(result.exclude) or 'none'}")
    rows = []
    for g in result.groups:
        p = g.problem
        shape = f"n={p.n} k={p.k}" if p.kind == "linear" else f"E={p.experts} H={p.k} I={p.n} top{p.top_k}"
        names = g.names[0] if len(g.names) == 1 else f"{len(g.names)} layers ({g.names[0]}, ...)"
        served = "-" if g.served_scheme is None else g.served_scheme.name
        if g.backend is not None and g.outcome.fallback:
            served += f" ({g.outcome.fallback} fallback)"
        rows.append([names, p.kind, shape, g.checkpoint_scheme.name, served, g.backend or "NONE"])
    print(table(["layers", "kind", "shape", "checkpoint scheme", "served as", "backend"], rows))
    for g in result.groups:
        print()
        if list_layers and len(g.names) > 1:
            print(f"{len(g.names)} layers:")
            print("\n".join(f"  {name}" for name in g.names))
        else:
            print(f"{g.names[0]}{f' and {len(g.names) - 1} more (--layers lists them)' if len(g.names) > 1 else ''}:")
        if g.backend is None:
            print(str(g.outcome).removesuffix(g.outcome.hint).rstrip())  # the engine's hint is in words
            print(f"hint: {_hint(g, result)}")
        else:
            print(g.plan.explain())


def _hint(group: LayerGroup, result: CheckpointResolution) -> str:
    """What to change on this command line, from the structured outcome; a flag already given
    is not suggested again."""
    if isinstance(group.outcome, ForcedBackendError):
        given = force_for_layer(result.force, group.names[0]) is not None
        drop = "--force" if given else f"${ENV_BACKEND} (unset it)"
        return (f"the forced backend cannot serve these layers, and quantoracle does not fall back "
                f"silently: force another backend, or drop {drop}")
    hints = []
    if group.problem.scheme.activation is not None and result.activation_fallback == "error":
        hints.append("pass --activation-fallback weight_only (serve the weights with 16-bit activations) "
                     "or --activation-fallback emulate (exact W4A4 emulation)")
    if result.exclude:
        hints.append(f"drop --exclude {' --exclude '.join(result.exclude)}")
    hints.append("choose another --device or --dtype, or install a plugin that serves this case")
    return "; or ".join(hints)
