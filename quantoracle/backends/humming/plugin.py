"""Declares the Humming backend: NVFP4 W4A16 dense GEMM and fused MoE from ``humming-kernels``
(vLLM's default NVFP4 weight-only kernels on sm90), JIT-compiled at prepare; W4A4 checkpoints
are served weight-only (the engine's ``weight_only`` fallback)."""

from quantoracle.backends.base import Kernels
from quantoracle.backends.humming import CONSTRAINTS, TOLERANCE
from quantoracle.backends.humming.backend import HummingBackend
from quantoracle.oracle import BackendSpec, SchemeSupport, hookimpl
from quantoracle.schemes.keys import NVFP4_WEIGHT

SPEC = BackendSpec(
    name="humming",
    description="Humming (humming-kernels 0.1.19): NVFP4 weights dequantized in its JIT-compiled "
                "CUDA GEMMs, bf16/fp16 tensor cores",
    layer_kinds={"linear", "moe"},
    schemes=(SchemeSupport(weight=NVFP4_WEIGHT, activation=None, tolerance=TOLERANCE),),
    platforms={"cuda"},
    capabilities=CONSTRAINTS.capabilities,
    dtypes=CONSTRAINTS.activation_dtypes,
    moe_activations=CONSTRAINTS.moe_activations,
    n_multiple_of=CONSTRAINTS.n_multiple_of,
    k_multiple_of=CONSTRAINTS.k_multiple_of,
    tensor_parallel=CONSTRAINTS.tensor_parallel,
    expert_parallel=CONSTRAINTS.expert_parallel,
    layout="humming",
    requires=("humming",),
    install="pip install 'quantoracle[humming]'",
    priority=5,
)


def _kernels() -> Kernels:
    from quantoracle.backends.humming.kernels import fused_moe, linear, prepare_linear, prepare_moe

    return Kernels(prepare_linear, linear, prepare_moe, fused_moe)


@hookimpl
def quantoracle_backends():
    return [HummingBackend(SPEC, _kernels)]
