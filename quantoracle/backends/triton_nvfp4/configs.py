"""Launch configurations of the Triton NVFP4 kernels, as data.

Tables are keyed by the problem's shape, then by an M bucket: a call with M tokens uses the
entry of the smallest bucket >= M (the largest bucket beyond it). Shapes absent from the tables
use the ``"default"`` rows, whose split-K is then chosen by :func:`fill_split_k`. The tuned rows
come from ``benchmarks/bench_gemm.py --tune`` / ``bench_moe.py --tune`` on an H100 (see
docs/performance.md). :data:`DEQUANTIZE` holds, per dense shape, the M from which ``linear``
dequantizes the weight in row chunks and calls cuBLAS instead of running the fused kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

M_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096)


@dataclass(frozen=True)
class DenseConfig:
    """One dense launch: an output tile of ``block_n`` weight rows x ``block_m`` tokens; K split
    over ``split_k`` programs (only when all tokens fit one tile; 0 = choose by rule)."""

    block_n: int
    block_m: int
    split_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Tile:
    """One MoE GEMM's tile over weight rows (for gate/up: gate and up rows together), and its
    launch knobs; ``split_k`` K slices (the down GEMM only: its slices are added by the top-k
    sum)."""

    block_n: int
    num_warps: int
    num_stages: int
    split_k: int = 1


@dataclass(frozen=True)
class MoEConfig:
    """A fused-MoE call: ``block_m`` routed tokens per expert block (the sort's padding unit,
    shared by both GEMMs), the gate/up GEMM's tile and the down GEMM's tile."""

    block_m: int
    up: Tile
    down: Tile

    def __post_init__(self) -> None:
        if self.up.split_k != 1:
            raise ValueError("the gate/up GEMM cannot split K (its epilogue is nonlinear)")


def _d(block_n, block_m, split_k, warps, stages) -> DenseConfig:
    return DenseConfig(block_n, block_m, split_k, warps, stages)


def _m(block_m, up, down) -> MoEConfig:
    return MoEConfig(block_m, Tile(*up), Tile(*down))


DENSE: dict[object, dict[int, DenseConfig]] = {
    "default": {
        1: _d(64, 16, 0, 4, 4),
        4: _d(64, 16, 0, 4, 4),
        16: _d(64, 16, 0, 4, 4),
        64: _d(128, 64, 0, 4, 3),
        256: _d(128, 64, 1, 4, 3),
        1024: _d(256, 128, 1, 8, 2),
        4096: _d(256, 128, 1, 8, 2),
    },
    # Tuned on an H100 80GB HBM3 (bench_gemm.py --tune; docs/performance.md).
    (4096, 4096): {
        1: _d(64, 16, 4, 4, 4), 4: _d(64, 16, 4, 4, 4), 16: _d(64, 16, 4, 4, 4),
        64: _d(64, 64, 2, 4, 4), 256: _d(128, 64, 1, 4, 3), 1024: _d(256, 128, 1, 8, 2),
        4096: _d(256, 128, 1, 8, 2),
    },
    (28672, 8192): {
        1: _d(128, 16, 4, 4, 4), 4: _d(128, 16, 4, 4, 4), 16: _d(128, 16, 4, 4, 4),
        64: _d(128, 64, 1, 4, 3), 256: _d(128, 64, 1, 4, 3), 1024: _d(256, 128, 1, 8, 2),
        4096: _d(256, 128, 1, 8, 2),
    },
}
"""(N, K) -> M bucket -> config."""


@dataclass(frozen=True)
class DequantizeConfig:
    """The dense large-M path (``gemm.linear``): from ``min_m`` tokens on, the weight is
    dequantized in row chunks into a scratch buffer and multiplied by cuBLAS. The dequantize
    kernel's tile: ``block_n`` weight rows x one 128-element chunk of K, ``num_warps`` warps."""

    min_m: int
    block_n: int = 64
    num_warps: int = 8


SCRATCH_BYTES = 64 << 20
"""Bound of the large-M path's transient scratch (one row chunk of dequantized weights)."""

DEQUANTIZE: dict[object, DequantizeConfig] = {
    "default": DequantizeConfig(1024),
    # Measured on an H100 80GB HBM3 (bench_gemm.py times both paths from M = 64 on; the tile
    # from a sweep of the kernel alone; docs/performance.md).
    (4096, 4096): DequantizeConfig(256),
    (28672, 8192): DequantizeConfig(512),
}
"""(N, K) -> the large-M path's threshold and dequantize tile."""

MOE: dict[object, dict[int, MoEConfig]] = {
    "default": {
        1: _m(16, (64, 4, 4), (64, 2, 4)),
        4: _m(16, (64, 4, 6), (64, 2, 4)),
        16: _m(16, (128, 4, 4), (64, 2, 4)),
        64: _m(16, (128, 4, 4), (64, 2, 4)),
        256: _m(16, (128, 4, 4), (128, 4, 4)),
        1024: _m(64, (128, 4, 3), (128, 4, 3)),
        4096: _m(64, (128, 4, 3), (128, 4, 3)),
    },
    # Tuned on an H100 80GB HBM3 (bench_moe.py --tune; docs/performance.md).
    (256, 2048, 512, 8): {
        1: _m(16, (32, 2, 4), (32, 2, 4)), 4: _m(16, (64, 4, 6), (64, 2, 4)),
        16: _m(16, (64, 2, 4), (128, 4, 4)), 64: _m(16, (128, 4, 4), (64, 2, 4)),
        256: _m(16, (128, 4, 4), (128, 4, 4)), 1024: _m(32, (128, 4, 4), (64, 2, 4)),
        4096: _m(64, (128, 4, 3), (128, 4, 3)),
    },
    (128, 2048, 768, 8): {
        1: _m(16, (32, 2, 4), (32, 2, 4)), 4: _m(16, (64, 4, 6), (64, 2, 4)),
        16: _m(16, (64, 2, 4), (128, 4, 4)), 64: _m(16, (128, 4, 4), (64, 2, 4)),
        256: _m(16, (128, 4, 4), (128, 4, 4)), 1024: _m(64, (128, 4, 3), (128, 4, 3)),
        4096: _m(64, (128, 4, 3), (128, 4, 3)),
    },
    (8, 4096, 14336, 2): {
        1: _m(16, (64, 4, 4), (128, 4, 4, 4)), 4: _m(16, (64, 4, 4), (128, 4, 4, 4)),
        16: _m(16, (128, 4, 4), (128, 4, 4, 4)), 64: _m(16, (128, 4, 4), (128, 4, 4, 4)),
        256: _m(64, (128, 4, 3), (128, 4, 3)), 1024: _m(64, (128, 4, 3), (128, 4, 3)),
        4096: _m(128, (128, 8, 3), (128, 8, 3)),
    },
    (256, 7168, 2048, 8): {
        1: _m(16, (64, 4, 6), (64, 2, 4)), 4: _m(16, (64, 2, 4), (64, 2, 4)),
        16: _m(16, (128, 4, 4), (64, 2, 4)), 64: _m(16, (128, 4, 4), (64, 2, 4)),
        256: _m(16, (128, 4, 4), (64, 2, 4)), 1024: _m(32, (128, 4, 4), (128, 4, 4)),
        4096: _m(64, (128, 4, 3), (128, 4, 3)),
    },
}
"""(experts, hidden, intermediate, top_k) -> M bucket -> config."""

TARGET_PROGRAMS = 264
"""Split-K by rule aims at this many programs (two per H100 multiprocessor)."""

MOE_VARIANTS = ("sorted", "unsorted")
"""The fused MoE's paths: ``sorted`` (GPU sort of the pairs by expert, expert-block GEMMs,
top-k sum: four launches) and ``unsorted`` (no sort: one program per (pair, row tile) for
gate/up, and the down GEMM per (token, row tile) with the top-k sum fused: two launches)."""


@dataclass(frozen=True)
class PairConfig:
    """The unsorted path: the gate/up GEMM's tile (per pair) and the down GEMM's (per token);
    ``split_k`` 0 = chosen by :func:`pair_split`."""

    up: Tile
    down: Tile


PAIRS: dict[object, PairConfig] = {
    # bench_moe.py --variants --sweep 1,4,16 on an H200 (docs/performance.md, 2026-12-04): the
    # fastest summed over M = 1, 4, 16 on each of the four benchmark shapes.
    "default": PairConfig(Tile(128, 4, 4, 1), Tile(64, 4, 4, 0)),
}
"""(experts, hidden, intermediate, top_k) -> the unsorted path's config (any M)."""

PAIR_TARGET_PROGRAMS = 1056
"""The unsorted path's split rule aims at this many programs (eight per H200 multiprocessor:
the sweep's best of 132, 264, 528, 1056 on the three shapes where the split was not capped)."""


def pair_split(tile: Tile, rows: int, n: int, iterations: int) -> int:
    """Slices of an unsorted-path GEMM over ``rows`` pairs (or tokens) x ``n`` weight rows
    whose K loop has ``iterations`` steps (gate/up: K chunks; down: top_k x K chunks): the
    tile's own, or enough for :data:`PAIR_TARGET_PROGRAMS` programs, two steps each at least
    (one when there is a single step)."""
    if tile.split_k:
        return tile.split_k
    programs = rows * triton.cdiv(n, tile.block_n)
    return max(1, min(triton.cdiv(PAIR_TARGET_PROGRAMS, programs), iterations // 2))


def pair_config(experts: int, hidden: int, intermediate: int, top_k: int) -> PairConfig:
    """The unsorted path's config for a MoE shape."""
    return PAIRS.get((experts, hidden, intermediate, top_k), PAIRS["default"])


UNSORTED_MAX_PAIRS_PER_EXPERT = 0.0
"""``moe_variant`` picks the unsorted path while M * top_k <= this x experts (vLLM's rule is
0.25: M * top_k * 4 <= E). 0 until measured: the only H200 run (2026-12-04) had the unsorted
path slower at M = 1 on the small-expert shapes (its down GEMM had 64 programs), and its fix
(slices across slots) is not measured yet; ``variant="unsorted"`` selects it by name."""


def moe_variant(m: int, experts: int, top_k: int) -> str:
    """The fused-MoE path for ``m`` tokens when the caller names none."""
    if m * top_k <= UNSORTED_MAX_PAIRS_PER_EXPERT * experts:
        return "unsorted"
    return "sorted"


def bucket(m: int) -> int:
    """The M bucket serving ``m`` tokens."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def fill_split_k(cfg: DenseConfig, m: int, n: int, k_chunks: int) -> DenseConfig:
    """``cfg`` with ``split_k`` chosen by rule where the table says 0: enough K slices for
    :data:`TARGET_PROGRAMS` programs, at least two 128-chunks each; 1 if M needs several tiles."""
    if cfg.split_k:
        return cfg
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    split = 1
    if m <= cfg.block_m:
        split = max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles), k_chunks // 2))
    return DenseConfig(cfg.block_n, cfg.block_m, split, cfg.num_warps, cfg.num_stages)


def dense_config(m: int, n: int, k: int, k_chunks: int) -> DenseConfig:
    """The config of an ``[m, k] x [n, k]^T`` launch."""
    table = DENSE.get((n, k), DENSE["default"])
    return fill_split_k(table[bucket(m)], m, n, k_chunks)


def dequantize_config(n: int, k: int) -> DequantizeConfig:
    """The large-M path's threshold and tile for an ``[n, k]`` weight."""
    return DEQUANTIZE.get((n, k), DEQUANTIZE["default"])


def moe_config(m: int, experts: int, hidden: int, intermediate: int, top_k: int) -> MoEConfig:
    """The config of a fused-MoE call with ``m`` tokens."""
    table = MOE.get((experts, hidden, intermediate, top_k), MOE["default"])
    return table[bucket(m)]
