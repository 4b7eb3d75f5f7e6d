"""Declares the Triton NVFP4 backend: W4A16 dense GEMM and fused MoE with in-register
dequantization, for CUDA GPUs from Ampere (sm80) on; exact W4A4 by emulation. The dense GEMM
has two variants (one weight layout): ``fused`` and ``dequantize`` (row chunks dequantized to a
transient scratch, then cuBLAS; weight-only); the fused MoE has ``sorted`` and ``unsorted``
(``CONSTRAINTS.moe_variants``); plans choose between them per batch size."""

from quantoracle.backends.base import KernelBackend, Kernels
from quantoracle.backends.triton_nvfp4 import CONSTRAINTS
from quantoracle.oracle import BackendSpec, SchemeSupport, Variant, hookimpl
from quantoracle.schemes.keys import NVFP4_ACT_DYNAMIC, NVFP4_WEIGHT

MOE_PATHS = {
    "sorted": "GPU sort by expert, expert-block GEMMs, top-k sum",
    "unsorted": "no sort: one program per routed pair (gate/up), down with the top-k sum fused (decode)",
}

SPEC = BackendSpec(
    name="triton_nvfp4",
    description="Triton: NVFP4 weights dequantized in registers, bf16/fp16 tensor cores",
    layer_kinds={"linear", "moe"},
    schemes=(
        SchemeSupport(weight=NVFP4_WEIGHT, activation=None),
        SchemeSupport(weight=NVFP4_WEIGHT, activation=NVFP4_ACT_DYNAMIC, emulated=True),
    ),
    platforms={"cuda"},
    min_capability=CONSTRAINTS.min_capability,
    dtypes=CONSTRAINTS.activation_dtypes,
    moe_activations=CONSTRAINTS.moe_activations,
    k_multiple_of=CONSTRAINTS.k_multiple_of,
    expert_parallel=CONSTRAINTS.expert_parallel,
    variants=(
        *(Variant(name=name, layer_kinds={"moe"}, min_tokens=low, max_tokens=high, priority=10 - rank,
                  description=MOE_PATHS[name])
          for rank, (name, (low, high)) in enumerate(CONSTRAINTS.moe_variants)),
        Variant(name="fused", layer_kinds={"linear"},
                description="one kernel: weights decoded in registers, split-K at small M"),
        Variant(name="dequantize", layer_kinds={"linear"},
                schemes=(SchemeSupport(weight=NVFP4_WEIGHT, activation=None),),
                description="row chunks dequantized to a <= 64 MiB scratch, then cuBLAS (large M)",
                priority=9),
    ),
    requires=("triton",),
    priority=10,
)


def _kernels() -> Kernels:
    from quantoracle.backends.triton_nvfp4.gemm import linear, prepare_linear
    from quantoracle.backends.triton_nvfp4.moe import fused_moe, prepare_moe

    return Kernels(prepare_linear, linear, prepare_moe, fused_moe)


@hookimpl
def quantoracle_backends():
    return [KernelBackend(SPEC, _kernels)]
