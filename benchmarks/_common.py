"""Shared helpers of the kernel benchmarks (CUDA): the two ceilings, graph timing, random NVFP4.

Timing is :mod:`quantoracle.timing` (re-exported here), the one method ``quantoracle tune``
uses too: each measured callable is one layer call on its own inputs; ``graph_time_us`` captures
a list of them (rotating inputs and, where the weights would fit in L2, rotating weight copies
or routings, so no call finds its weights in L2) in one CUDA graph and reports the median over
replays of the graph time divided by the number of calls.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from quantoracle.timing import capture_graph, event_ms as _event_ms, graph_time_us, random_moe, random_nvfp4  # noqa: E402,F401


def require_cuda(tool: str) -> None:
    """Exit with status 2 and one line on stderr naming ``tool`` when torch sees no CUDA GPU.
    Every GPU-only benchmark calls this after parsing its arguments (``--help`` works anywhere)."""
    if not torch.cuda.is_available():
        print(f"{tool}: needs a CUDA GPU, and torch {torch.__version__} sees none "
              f"(CUDA build: {torch.version.cuda or 'no'})", file=sys.stderr)
        sys.exit(2)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    b.copy_(a)
    ms = statistics.median(_event_ms(lambda: b.copy_(a), 20))
    return 2 * nbytes / (ms * 1e-3)


def matmul_rate(n: int = 8192) -> float:
    """FLOP/s of an n x n x n bf16 torch.mm on random data."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    torch.mm(a, b)
    ms = statistics.median(_event_ms(lambda: torch.mm(a, b), 20))
    return 2 * n**3 / (ms * 1e-3)


def graph_checks(fn, buffers: list[torch.Tensor], new_values: list[torch.Tensor]) -> tuple[bool, bool]:
    """Capture ``fn()`` (which reads ``buffers``) in a CUDA graph. Returns whether the replay
    equals an eager call bit for bit, and whether, after ``new_values`` are copied into
    ``buffers`` and the captured output is filled with NaN, a second replay equals an eager call
    on them (what a serving engine does with a captured graph)."""
    holder = []
    graph = capture_graph([lambda: holder.append(fn())])
    captured = holder[-1]
    same = torch.equal(captured, fn())
    for buffer, value in zip(buffers, new_values):
        buffer.copy_(value)
    captured.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    return same, torch.equal(captured, fn())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def device_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "sms": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_json(out_dir: str, name: str, data) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


class Recorder:
    """The cells of a GPU check run: ``record(cell)`` prints the cell on one line (a
    ``traceback`` entry after it) and rewrites ``out_dir/name`` with ``{**meta, "cells": [...]}``,
    so a run stopped by its time limit keeps what it measured; ``over_budget()`` is true once
    ``budget_s`` seconds have passed since the recorder was made."""

    def __init__(self, out_dir: str, name: str, budget_s: float, **meta) -> None:
        self.out_dir, self.name, self.budget_s, self.meta = out_dir, name, budget_s, meta
        self.cells: list[dict] = []
        self.began = time.perf_counter()

    def record(self, cell: dict) -> None:
        self.cells.append(cell)
        print({key: (round(v, 5) if isinstance(v, float) else v) for key, v in cell.items()
               if key != "traceback"}, flush=True)
        if "traceback" in cell:
            print(cell["traceback"], flush=True)
        write_json(self.out_dir, self.name, {**self.meta, "cells": self.cells})

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.began


def fmt_table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
