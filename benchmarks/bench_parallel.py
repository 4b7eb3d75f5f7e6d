"""Time one tensor- or expert-parallel NVFP4 MoE layer against the same layer on one device.

For each DESIGN.md benchmark shape (E, hidden, intermediate, top-k) and token count M, every
rank builds the same random W4A16 NVFP4 experts (seeded, on its own device), the unsharded
layer and its own shard (rank = ep_rank * tp + tp_rank, as ``NVFP4FusedMoE`` checks), then:

1. correctness: the sharded layer's output (after its all-reduce) against the unsharded one on
   the same routed tokens, as a relative Frobenius error (16-bit partial sums are rounded before
   the all-reduce, so the bound is a 16-bit one; float32 must agree to ~1e-6);
2. timing, median of ``--reps``: the unsharded layer on one device, the sharded layer on all
   ranks (the slowest rank's median), and the all-reduce of the [M, H] output alone. On CUDA
   each repetition starts from a barrier and a flushed L2; ``--timing graph`` (default) replays a
   CUDA graph of the call, ``events`` times eager calls with CUDA events. On CPU: wall clock.

Rank 0 prints a table and writes ``parallel-tp{tp}-ep{ep}-{device}.json`` under ``--out``. The
process exits 1 if any correctness check failed.

    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py --tp 2            # TP2 on 2 GPUs
    torchrun --nproc-per-node 4 benchmarks/bench_parallel.py --tp 2 --ep 2     # TP2 x EP2
    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py --device cpu --tiny --ep 2

Only the CPU/gloo ``--tiny`` mode has been run; see docs/parallel.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from _common import require_cuda
from quantoracle.layers import NVFP4FusedMoE
from quantoracle.oracle import ParallelConfig
from quantoracle.report import table
from quantoracle.schemes.scheme import W4A16_NVFP4
from quantoracle.schemes.tensors import MoEWeights, NVFP4Tensor

SHAPES = ((256, 2048, 512, 8), (128, 2048, 768, 8), (8, 4096, 14336, 2), (256, 7168, 2048, 8))
TOKENS = (1, 4, 16, 64, 256, 1024, 4096)
TINY_SHAPES = ((8, 64, 128, 2), (16, 128, 128, 4))  # I/tp a multiple of 16 up to tp=8
TINY_TOKENS = (1, 4, 16, 64)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # relative Frobenius
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
L2_FLUSH_BYTES = 256 << 20  # several times an H100's or H200's 50 MB L2


def random_nvfp4(experts: int, rows: int, cols: int, shards: int, gen: torch.Generator) -> NVFP4Tensor:
    """Random codes ``[experts, rows, cols/2]``, block scales in [0.5, 2] and a global scale that
    makes each row's dot product with a unit-variance input O(1) (the E2M1 codes' RMS is ~3)."""
    device = gen.device
    packed = torch.randint(0, 256, (experts, rows, cols // 2), dtype=torch.uint8, device=device, generator=gen)
    scale = torch.empty(experts, rows, cols // 16, device=device).uniform_(0.5, 2.0, generator=gen)
    global_scale = torch.full((experts, shards), 1 / (3 * cols**0.5), device=device)
    return NVFP4Tensor(packed, scale.to(torch.float8_e4m3fn), global_scale)


def random_experts(shape: Sequence[int], device: torch.device, seed: int = 0) -> MoEWeights:
    """W4A16 experts of ``shape`` (E, H, I, top-k), the same on every rank (seeded generator)."""
    experts, hidden, intermediate, _ = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    return MoEWeights(random_nvfp4(experts, 2 * intermediate, hidden, 2, gen),
                      random_nvfp4(experts, hidden, intermediate, 1, gen))


def shard(weights: MoEWeights, p: ParallelConfig) -> MoEWeights:
    """This rank's part of ``weights``, as ``Checkpoint.moe(prefix, experts=..., tp=...)`` reads
    it from disk: experts ``[ep_rank*E/ep, (ep_rank+1)*E/ep)``, and of each the intermediate
    slice ``[tp_rank*I/tp, (tp_rank+1)*I/tp)`` (gate and up rows, down columns)."""
    local = weights.experts // p.ep_size
    experts = slice(p.ep_rank * local, (p.ep_rank + 1) * local)
    part = weights.intermediate // p.tp_size
    inner = slice(p.tp_rank * part, (p.tp_rank + 1) * part)

    def gate_up_rows(t: torch.Tensor) -> torch.Tensor:
        gate, up = t[experts].chunk(2, dim=1)
        return torch.cat([gate[:, inner], up[:, inner]], dim=1)

    def down_cols(t: torch.Tensor, elements_per_entry: int) -> torch.Tensor:  # 2 per byte, 16 per scale
        return t[experts, :, inner.start // elements_per_entry : inner.stop // elements_per_entry].contiguous()

    gate_up, down = weights.gate_up, weights.down
    return MoEWeights(
        NVFP4Tensor(gate_up_rows(gate_up.packed), gate_up_rows(gate_up.block_scale),
                    gate_up.global_scale[experts].contiguous()),
        NVFP4Tensor(down_cols(down.packed, 2), down_cols(down.block_scale, 16),
                    down.global_scale[experts].contiguous()),
        first_expert=experts.start,
    )


class Timer:
    """Median time of a call in microseconds, every rank starting each repetition together."""

    def __init__(self, device: torch.device, timing: str, reps: int, warmup: int) -> None:
        self.device, self.timing, self.reps, self.warmup = device, timing, reps, warmup
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.device.type == "cpu":
            return self._wall(fn)
        run = self._graphed(fn) if self.timing == "graph" else fn
        for _ in range(self.warmup):
            run()
        times = []
        for _ in range(self.reps):
            dist.barrier()
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            times.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in times) * 1e3

    def _wall(self, fn: Callable[[], Any]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    @staticmethod
    def _graphed(fn: Callable[[], Any]) -> Callable[[], None]:
        """One call captured in a CUDA graph (warmed up on a side stream first, which also creates
        the NCCL communicator outside the capture); returns its replay."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay


def slowest(value: float, device: torch.device) -> float:
    """The largest ``value`` over all ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def bench_shape(shape: Sequence[int], tokens: Sequence[int], parallel: ParallelConfig, args: argparse.Namespace,
                device: torch.device, timer: Timer) -> list[dict[str, Any]]:
    experts, hidden, intermediate, top_k = shape
    options = dict(top_k=top_k, experts=experts, scheme=W4A16_NVFP4, dtype=args.dtype, force=args.force)
    full = random_experts(shape, device)
    single = NVFP4FusedMoE(full, **options)
    sharded = NVFP4FusedMoE(shard(full, parallel), parallel=parallel, **options)
    rows = []
    for m in tokens:
        gen = torch.Generator(device=device).manual_seed(m)
        x = torch.randn(m, hidden, device=device, generator=gen).to(args.dtype)
        weights, ids = single.route(torch.randn(m, experts, device=device, generator=gen))
        want = single.forward_routed(x, weights, ids).float()
        got = sharded.forward_routed(x, weights, ids).float()
        error = slowest(((got - want).norm() / want.norm()).item(), device)
        row = {"shape": list(shape), "tokens": m, "backend": sharded.backend, "rel_error": error,
               "correct": error <= TOLERANCE[args.dtype]}
        if row["correct"]:
            reduced = torch.zeros(m, hidden, dtype=args.dtype, device=device)
            row.update(
                single_us=timer(lambda: single.forward_routed(x, weights, ids)),
                sharded_us=slowest(timer(lambda: sharded.forward_routed(x, weights, ids)), device),
                all_reduce_us=slowest(timer(lambda: dist.all_reduce(reduced)), device),
            )
            row["speedup"] = row["single_us"] / row["sharded_us"]
        rows.append(row)
    return rows


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: world size / ep)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help=f"shapes {TINY_SHAPES}, M in {TINY_TOKENS}")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts M")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--timing", choices=("graph", "events"), default="graph", help="CUDA only")
    parser.add_argument("--reps", type=int, default=None, help="default: 50 on CUDA, 5 on CPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--force", default=None, help="backend name (default: what resolve picks)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON report")
    args = parser.parse_args(argv)
    args.dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    args.reps = args.reps or (50 if args.device == "cuda" else 5)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cuda":
        require_cuda("bench_parallel")
    if "RANK" not in os.environ:
        sys.exit("bench_parallel: launch with torchrun --nproc-per-node N (one process per device)")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = args.tp or world // args.ep
    if tp * args.ep != world:
        sys.exit(f"bench_parallel: tp={tp} x ep={args.ep} must equal the world size {world}")
    parallel = ParallelConfig.for_rank(rank, tp, args.ep)
    shapes, tokens = (TINY_SHAPES, TINY_TOKENS) if args.tiny else (SHAPES, TOKENS)
    timer = Timer(device, args.timing, args.reps, args.warmup)
    try:
        rows = [row for shape in shapes
                for row in bench_shape(shape, args.tokens or tokens, parallel, args, device, timer)]
    finally:
        dist.destroy_process_group()
    if rank == 0:
        report(rows, args, device, world, tp)
    return 0 if all(row["correct"] for row in rows) else 1


def report(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device, world: int, tp: int) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    timing = args.timing if device.type == "cuda" else "wall clock"
    print(f"NVFP4 W4A16 MoE, {world} x {name}, tp={tp} ep={args.ep}, {str(args.dtype).removeprefix('torch.')}, "
          f"backend {rows[0]['backend']}, {timing} median of {args.reps}")
    fmt = lambda row, key: f"{row[key]:.1f}" if key in row else "-"  # noqa: E731
    print(table(
        ["E, H, I, k", "M", "1 device us", "sharded us", "all-reduce us", "speedup", "rel error"],
        [[", ".join(map(str, row["shape"])), row["tokens"], fmt(row, "single_us"), fmt(row, "sharded_us"),
          fmt(row, "all_reduce_us"), f"{row['speedup']:.2f}x" if "speedup" in row else "-",
          f"{row['rel_error']:.2e}" + ("" if row["correct"] else " FAIL")] for row in rows],
    ))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"parallel-tp{tp}-ep{args.ep}-{device.type}.json"
        meta = {"device": name, "world": world, "tp": tp, "ep": args.ep,
                "dtype": str(args.dtype).removeprefix("torch."), "timing": timing, "reps": args.reps,
                "torch": torch.__version__}
        path.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
