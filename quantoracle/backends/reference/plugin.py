"""Declares the torch reference backend: every NVFP4 layer on every device, exact, slowest."""

from quantoracle.backends.base import KernelBackend, Kernels
from quantoracle.oracle import BackendSpec, SchemeSupport, hookimpl
from quantoracle.schemes.keys import NVFP4_ACT_DYNAMIC, NVFP4_WEIGHT

SPEC = BackendSpec(
    name="reference",
    description="torch: dequantize one weight (one expert) at a time to float32; ground truth",
    layer_kinds={"linear", "moe"},
    schemes=(
        SchemeSupport(weight=NVFP4_WEIGHT, activation=None),
        SchemeSupport(weight=NVFP4_WEIGHT, activation=NVFP4_ACT_DYNAMIC, emulated=True),
    ),
    platforms={"cpu", "cuda", "rocm"},
    moe_activations={"silu", "gelu"},
    priority=0,
)


def _kernels() -> Kernels:
    from quantoracle.backends.reference.linear import linear
    from quantoracle.backends.reference.moe import fused_moe

    return Kernels(_unchanged, linear, _unchanged, fused_moe)


def _unchanged(weights):
    return weights


@hookimpl
def quantoracle_backends():
    return [KernelBackend(SPEC, _kernels)]
