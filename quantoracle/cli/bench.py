"""``quantoracle bench``: the time of one resolve over the full matrix, cold and cached."""

from __future__ import annotations

import argparse
import json
import os
import platform

from quantoracle.cli.options import positive_int
from quantoracle.report import table

HELP = "time resolve over the full matrix (cold and cached)"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help=HELP, description=f"Time resolve over the full matrix "
                                   "(every named scheme x layer kind x device x dtype x policy), "
                                   "with an empty cache and cached.")
    parser.add_argument("--rounds", type=positive_int, default=5, help="passes over the matrix")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="also write resolve.json into DIR (created if missing)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
