"""``quantoracle env``: the fingerprint answers are made with here, the quarantine entries in
force and the tuning caches found (whether each applies): what a bug report should paste."""

from __future__ import annotations

import argparse
import json
from typing import Any

from quantoracle._version import __version__
from quantoracle.cli.options import ORACLE_DEVICES, DeviceChoice, add_json, oracle_device
from quantoracle.oracle import default_registry
from quantoracle.oracle.engine import environment, provenance
from quantoracle.oracle.fingerprint import fingerprint
from quantoracle.oracle.quarantine import ENV_QUARANTINE
from quantoracle.oracle.registry import Registry
from quantoracle.oracle.tuning import ENV_TUNING

HELP = "the device, software, plugins, quarantine and tuning caches answers are made with (for bug reports)"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "env", help=HELP,
        description="Print the fingerprint every answer carries (device name and capability, SM count, "
                    "memory, driver and CUDA, Python, torch, Triton, quantoracle and every plugin "
                    "distribution), the backends and broken plugins, the quarantine entries in force and "
                    "the tuning caches found with whether each applies. Paste it into a bug report.")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help=f"the device answers are made for: {ORACLE_DEVICES} (default: this machine)")
    parser.add_argument("--quarantine", default=None, metavar="PATH",
                        help=f"a quarantine file (JSON or TOML) to include (default: ${ENV_QUARANTINE} if set)")
    parser.add_argument("--tuning", default=None, metavar="PATH",
                        help=f"a tuning cache to include (default: ${ENV_TUNING} if set, the user cache, "
                             "the shipped caches)")
    add_json(parser, "the same")
    parser.set_defaults(run=run)


def report(choice: DeviceChoice, quarantine: str | None = None, tuning: str | None = None,
           registry: Registry | None = None) -> dict[str, Any]:
    """Everything ``env`` prints, JSON-ready: ``fingerprint`` (as every Resolution carries it,
    with its ``digest``), ``backends`` (name -> providing distribution and version),
    ``broken_plugins``, ``quarantine`` (``sources``, ``entries``) and ``tuning_caches`` (each
    with ``applies`` and, when not, ``why_not``). Raises what a resolve with these options
    raises for a bad quarantine file or tuning cache."""
    registry = registry or default_registry()
    # what every resolve computes (engine.provenance), not a second copy of it
    packages, _, distributions = provenance(registry)
    fp = fingerprint(choice.device, packages)
    env = environment(quarantine, tuning)
    origins = {name: registry.origin(name) for name in registry.backends}
    caches = []
    for source, cache in env.tuning.caches:
        why_not = cache.mismatch(fp, distributions)
        caches.append({"source": source, "match": cache.match, "created": cache.created,
                       "measurements": len(cache.measurements), "applies": why_not is None, "why_not": why_not})
    return {
        "quantoracle": __version__,
        "device_source": choice.source,
        "fingerprint": {**fp.model_dump(mode="json"), "digest": fp.digest},
        "backends": {name: {"plugin": o.plugin, "distribution": o.distribution, "version": o.version}
                     for name, o in origins.items()},
        "broken_plugins": [str(error) for error in registry.broken],
        "quarantine": {
            "sources": list(env.quarantine_sources),
            "entries": [{"source": e.source, "matches": e.describe(), "reason": e.reason, "link": e.link}
                        for e in env.quarantine],
        },
        "tuning_caches": caches,
    }


def run(args: argparse.Namespace) -> int:
    data = report(oracle_device(args.device), args.quarantine, args.tuning)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(text(data))
    return 0


def text(data: dict[str, Any]) -> str:
    fp = data["fingerprint"]
    device = fp["device"]
    if fp["gpu_name"]:
        device += (f": {fp['gpu_name']}, {fp['sm_count']} SMs, {fp['memory_bytes'] / 2**30:.1f} GiB, "
                   f"driver {fp['driver'] or 'unknown'}, CUDA {fp['cuda'] or 'unknown'}")
    lines = [
        f"quantoracle {data['quantoracle']} environment (fingerprint {fp['digest']}): paste this into a bug report",
        f"device      {device} ({data['device_source']})",
        f"software    python {fp['python']}, torch {fp['torch'] or 'not installed'}, "
        f"triton {fp['triton'] or 'not installed'}",
        "packages    " + ", ".join(f"{name} {version}" for name, version in fp["packages"]),
        "backends    " + ", ".join(
            f"{name} ({b['distribution'] or 'registered by code'}{' ' + b['version'] if b['version'] else ''})"
            for name, b in data["backends"].items()),
        "broken      " + ("; ".join(data["broken_plugins"]) or "none"),
        f"quarantine  {len(data['quarantine']['entries'])} entries in force from "
        + (", ".join(data["quarantine"]["sources"]) or "nowhere (allow_quarantined)"),
    ]
    lines += [f"  {e['matches']}: {e['reason']}" + (f" ({e['link']})" if e["link"] else "") + f" [{e['source']}]"
              for e in data["quarantine"]["entries"]]
    lines.append(f"tuning      {len(data['tuning_caches'])} caches found" + ("" if data["tuning_caches"] else
                 " (none: candidates rank by priority; `quantoracle tune` writes one)"))
    for c in data["tuning_caches"]:
        verdict = "applies" if c["applies"] else f"not used: {c['why_not']}"
        lines.append(f"  {c['source']} (match={c['match']}, {c['measurements']} measurements): {verdict}")
    return "\n".join(lines)
