"""Triton NVFP4 backend: W4A16 dense GEMM and fused MoE, weights dequantized in registers
(the dense GEMM at large M: in bounded row chunks to a transient scratch, then cuBLAS).

Public kernels: ``gemm.prepare_linear`` / ``gemm.linear`` and ``moe.prepare_moe`` /
``moe.fused_moe``; :data:`CONSTRAINTS` is what the plugin declares about them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Constraints:
    """What the kernels accept; anything else raises :class:`~quantoracle.errors.NumericsError`.

    - ``min_capability``: CUDA sm_80 and newer (no fp8 or Hopper-only instruction is required;
      measured on sm_90 only).
    - ``activation_dtypes``: x in bf16 or fp16; outputs in x's dtype.
    - ``k_multiple_of``: K (hidden and intermediate for MoE) a multiple of 16, NVFP4's block;
      K that is not a multiple of 128 is padded at prepare time (masked loads).
    - ``moe_activations``: the gate activations of the fused MoE.
    - ``cuda_graph_capturable``: ``fused_moe`` and ``linear`` never synchronize with the host.
    - ``expert_parallel``: ``MoEWeights.first_expert`` offsets are honoured (non-local experts
      contribute zero).
    - ``moe_variants``: the fused MoE's paths, selectable by name (``fused_moe(...,
      variant=name)``; None picks by M, ``configs.moe_variant``), each with the token range
      ``(min_m, max_m)`` where it is valid (None: no upper bound). Hard limits only: both
      paths compute the layer at any M; which is faster where is the configs' business.
      ``sorted``: GPU sort by expert, expert-block GEMMs, top-k sum (4 launches; the sort is
      two launches beyond 1024 routed pairs). ``unsorted``: no sort, one program per (pair,
      row tile) for gate/up, the down GEMM per (token, row tile) with the top-k sum fused
      (2 launches); meant for decode (where it wins: docs/performance.md, 2026-12-04).
    """

    min_capability: tuple[int, int] = (8, 0)
    activation_dtypes: tuple[str, ...] = ("bfloat16", "float16")
    k_multiple_of: int = 16
    moe_activations: tuple[str, ...] = ("silu", "gelu")
    cuda_graph_capturable: bool = True
    expert_parallel: bool = True
    moe_variants: tuple[tuple[str, tuple[int, int | None]], ...] = (
        ("sorted", (1, None)),
        ("unsorted", (1, None)),
    )


CONSTRAINTS = Constraints()
