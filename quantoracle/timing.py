"""GPU timing, one method for every measurement quantoracle makes (``quantoracle tune``, the
benchmarks): a list of calls on rotating inputs (and, where weights would sit in L2, rotating
weight copies or routings) warmed up, captured in one CUDA graph, replayed; the median over
replays of the graph time divided by the number of calls. CUDA only; imports torch."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

from quantoracle.schemes.tensors import MoEWeights, NVFP4Tensor


def event_ms(fn: Callable[[], object], reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn``, by CUDA events."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def capture_graph(calls: Sequence[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    """``calls`` warmed up on a side stream (compile, allocate), then captured in one CUDA graph
    and replayed once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def graph_time_us(calls: Sequence[Callable[[], object]], target_s: float = 0.25, max_reps: int = 50) -> float:
    """Median microseconds per call of ``calls``, replayed as one CUDA graph."""
    graph = capture_graph(calls)
    estimate_ms = statistics.median(event_ms(graph.replay, 3))
    reps = max(5, min(max_reps, int(target_s * 1e3 / max(estimate_ms, 1e-3))))
    ms = statistics.median(event_ms(graph.replay, reps))
    del graph
    return ms * 1e3 / len(calls)


def random_nvfp4(lead: tuple[int, ...], rows: int, cols: int, shards: int, seed: int,
                 device: str | torch.device = "cuda") -> NVFP4Tensor:
    """Random NVFP4 weights: uniform codes, block scales 4..448, global ~1e-4 (weights of a few
    1e-2): realistic bytes for timing, no quantizer needed."""
    g = torch.Generator(device=device).manual_seed(seed)
    packed = torch.randint(0, 256, (*lead, rows, cols // 2), dtype=torch.uint8, device=device, generator=g)
    scales = torch.randint(0x50, 0x7F, (*lead, rows, cols // 16), dtype=torch.uint8,
                           device=device, generator=g).view(torch.float8_e4m3fn)
    global_scale = (torch.rand(*lead, shards, device=device, generator=g) + 0.5) * 2e-5
    return NVFP4Tensor(packed, scales, global_scale)


def random_moe(experts: int, hidden: int, intermediate: int, seeds: tuple[int, int] = (1, 2),
               device: str | torch.device = "cuda") -> MoEWeights:
    """Random NVFP4 experts (:func:`random_nvfp4`, seeded by ``seeds``): gate/up
    ``[E, 2I, H]`` with a global scale per shard, down ``[E, H, I]``."""
    return MoEWeights(random_nvfp4((experts,), 2 * intermediate, hidden, 2, seed=seeds[0], device=device),
                      random_nvfp4((experts,), hidden, intermediate, 1, seed=seeds[1], device=device))
