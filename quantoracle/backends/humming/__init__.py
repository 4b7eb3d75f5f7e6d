"""Humming backend: vLLM's default NVFP4 W4A16 kernel library on Hopper (``humming-kernels``,
JIT-compiled CUDA through NVRTC), wrapped through its public Python API.

- :mod:`.convert`: NVFP4Tensor / MoEWeights to Humming's weight schema (padding, re-layout),
  and the byte count of the result, as pure functions where Humming is not needed.
- :mod:`.kernels`: ``prepare_linear`` / ``linear`` and ``prepare_moe`` / ``fused_moe``; the
  ``prepare`` calls JIT-compile every kernel a layer can use.
- :mod:`.routing`: quantoracle's token sort glue (block -> expert table) and the weighted top-k
  sum, in Triton.

Nothing here imports ``humming`` at module import; :data:`CONSTRAINTS` is what the plugin
declares about the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Constraints:
    """What Humming 0.1.19 accepts for NVFP4 weights with 16-bit activations (read in its source:
    ``humming/kernel/humming.py`` check_shape/check_dtype, ``humming/transform.py``,
    ``humming/tune/__init__.py``).

    - ``capabilities``: bf16 activations need sm80 (``check_dtype``). fp16 passes that check
      on sm75, but whether the NVFP4 path (e4m3 block scales) runs there is not established,
      so sm75 is not declared (``dtype_capabilities`` could say "fp16 from sm75" once it is).
      Its tuning tables name sm75..sm121 (sm12x falls back to sm120's): ``sm80-sm121``.
      Measured on sm90 only.
    - ``activation_dtypes``: x in bf16 or fp16 (Humming's ``c_dtype`` equals the 16-bit
      ``a_dtype``); outputs in x's dtype. The kernels are compiled per dtype.
    - ``n_multiple_of``: N padded by ``prepare`` to a multiple of 256 (``pad_shape_n`` must be a
      multiple of 8, so N itself must be).
    - ``k_multiple_of``: NVFP4's 16-element block; K padded to a multiple of 128 in ``prepare``.
    - ``pad_n`` / ``pad_k``: the padding ``prepare`` applies (the values vLLM uses; Humming
      needs N padded to 64 and K to 32 at least, and tiles that divide the padded shape).
    - ``moe_activations``: fused into Humming's input processing between the two GEMMs.
    - ``expert_parallel``: quantoracle's sort keeps only local experts' pairs; the others
      contribute zero. ``tensor_parallel``: a shard is an ordinary smaller layer.
    - ``cuda_graph_capturable``: no host synchronization in ``linear`` / ``fused_moe``; every
      GEMM kernel is compiled and loaded in ``prepare``.
    """

    capabilities: str = "sm80-sm121"
    activation_dtypes: tuple[str, ...] = ("bfloat16", "float16")
    n_multiple_of: int = 8
    k_multiple_of: int = 16
    pad_n: int = 256
    pad_k: int = 128
    moe_activations: tuple[str, ...] = ("silu", "gelu")
    tensor_parallel: bool = True
    expert_parallel: bool = True
    cuda_graph_capturable: bool = True


CONSTRAINTS = Constraints()

TOLERANCE = 1e-2
"""The relative error ``||y - y_ref|| / ||y_ref||`` declared against the reference backend (bf16
and fp16); measured on the H200 in docs/humming.md."""
