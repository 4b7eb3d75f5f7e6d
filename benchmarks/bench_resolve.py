"""Resolve time over the full matrix, cold (rules evaluated) and cached; prints a table and
writes JSON. Run: python benchmarks/bench_resolve.py [--out DIR]  (or: quantoracle bench)."""

import sys

from quantoracle.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
