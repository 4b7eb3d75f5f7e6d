"""``quantoracle backends``: every registered backend, its rules and the distribution that
provides it; then every broken plugin and why."""

from __future__ import annotations

import argparse
import json
from math import lcm
from typing import Any

from quantoracle._version import __version__
from quantoracle.cli.options import add_json
from quantoracle.oracle import default_registry
from quantoracle.oracle.registry import PluginOrigin
from quantoracle.oracle.spec import BackendSpec, SchemeSupport, Variant, describe_capabilities
from quantoracle.report import table
from quantoracle.schemes.scheme import Scheme

HELP = "every registered backend and its rules, and every broken plugin"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "backends", help=HELP,
        description="List every registered backend (highest priority first) with the rules it "
                    "declares and the distribution that provides it, then every installed plugin "
                    "that failed to load and why.")
    add_json(parser, "the backends (each spec in full) and the broken plugins")
    parser.set_defaults(run=run)


def scheme_name(support: SchemeSupport) -> str:
    """``w4a16_nvfp4``; ``fp4_e2m1+any`` for a weight key with any activation."""
    if support.activation == "any":
        return f"{support.weight.dtype}+any"
    return Scheme(weight=support.weight, activation=support.activation).name


def provider(origin: PluginOrigin) -> str:
    """``quantoracle 0.1.0``, ``my-plugin 1.2`` or ``registered by code``."""
    if origin.distribution is None:
        return "registered by code"
    return f"{origin.distribution} {origin.version or '(version unknown)'}"


def provided_by(backend: str) -> dict[str, str | None]:
    """The plugin and distribution (with its version) that declare ``backend``, for JSON."""
    origin = default_registry().origin(backend)
    return {"plugin": origin.plugin, "distribution": origin.distribution, "version": origin.version}


def _shape(spec: BackendSpec) -> str:
    text = f"n%{spec.n_multiple_of} k%{spec.k_multiple_of}"
    if "moe" in spec.layer_kinds and (spec.n_multiple_of, spec.k_multiple_of) != (1, 1):
        # a MoE layer's intermediate size is gate/up's N and down's K
        text += f" (MoE I%{lcm(spec.n_multiple_of, spec.k_multiple_of)})"
    return text


def _row(spec: BackendSpec, origin: PluginOrigin) -> list[object]:
    schemes = ", ".join(scheme_name(x) + (" (emulated)" if x.emulated else "") for x in spec.schemes)
    devices = ",".join(sorted(spec.platforms))
    if spec.capabilities:
        devices += f" {describe_capabilities(spec.capabilities)}"
    return [
        spec.name, spec.priority, "+".join(sorted(spec.layer_kinds)), schemes, devices,
        ",".join(sorted(spec.dtypes)), _shape(spec), ",".join(sorted(spec.moe_activations)),
        "+".join(p for p, on in (("tp", spec.tensor_parallel), ("ep", spec.expert_parallel)) if on) or "-",
        ",".join(spec.requires) or "-", provider(origin),
    ]


def _backend_json(spec: BackendSpec) -> dict[str, Any]:
    data = spec.model_dump(mode="json")
    for support, dumped in zip(spec.schemes, data["schemes"]):
        dumped["name"] = scheme_name(support)
    data["provided_by"] = provided_by(spec.name)
    return data


def _broken_json(error: Any) -> dict[str, Any]:
    entry_point = error.entry_point
    return {
        "plugin": error.plugin,
        "entry_point": None if entry_point is None else f"{entry_point.name} = {entry_point.value}",
        "distribution": error.distribution, "version": error.version,
        "cause": error.cause, "message": str(error),
    }


def run(args: argparse.Namespace) -> int:
    registry = default_registry()
    specs = sorted((b.spec for b in registry.backends.values()), key=lambda s: (-s.priority, s.name))
    if args.json:
        print(json.dumps({
            "quantoracle": __version__,
            "backends": [_backend_json(s) for s in specs],
            "broken": [_broken_json(e) for e in registry.broken],
        }, indent=2))
        return 0
    print(table(["backend", "prio", "layers", "schemes", "devices", "dtypes", "shape", "moe act",
                 "parallel", "requires", "provided by"], [_row(s, registry.origin(s.name)) for s in specs]))
    for spec in specs:
        if spec.description:
            print(f"  {spec.name}: {spec.description}")
        for variant in spec.variants:
            print(f"    {spec.name}/{_variant(spec, variant)}")
    if registry.broken:
        print(f"\n{len(registry.broken)} broken plugin(s), left out:")
        for error in registry.broken:
            print(f"  {error}")
    return 0


def _variant(spec: BackendSpec, variant: Variant) -> str:
    """``name (kinds; tokens; devices; shape; layout; schemes; priority): description``: the
    fields it sets."""
    merged = spec.for_variant(variant)
    facts = ["+".join(sorted(merged.layer_kinds))]
    if (merged.min_tokens, merged.max_tokens) != (1, None):
        facts.append(f"{merged.token_range} tokens")
    if variant.capabilities is not None:
        facts.append(f"capability {describe_capabilities(merged.capabilities)}")
    if variant.n_multiple_of is not None or variant.k_multiple_of is not None:
        facts.append(_shape(merged))
    if variant.layout:
        facts.append(f"layout {merged.layout_name}")
    if variant.schemes is not None:
        facts.append(", ".join(scheme_name(x) for x in variant.schemes) + " only")
    if variant.priority is not None:
        facts.append(f"priority {variant.priority}")
    return f"{variant.name} ({'; '.join(facts)}): {variant.description}"
