"""An out-of-tree quantoracle backend plugin, complete.

It declares W4A4 NVFP4 (FP4 activations) for Linear and MoE layers on Blackwell (sm100 or newer),
the kind of backend a native FP4 tensor-core kernel would register. This example has no such
kernel: it runs the W4A4 numerics through quantoracle's reference functions, so it is exact and
slow. Swap ``_kernels`` for your own to make it real.
"""

from quantoracle.backends.base import KernelBackend, Kernels
from quantoracle.oracle import BackendSpec, SchemeSupport, hookimpl
from quantoracle.schemes.keys import NVFP4_ACT_DYNAMIC, NVFP4_WEIGHT

SPEC = BackendSpec(
    name="example_w4a4",
    description="example plugin: W4A4 NVFP4 on sm100+ (runs the reference numerics)",
    layer_kinds={"linear", "moe"},
    schemes=(SchemeSupport(weight=NVFP4_WEIGHT, activation=NVFP4_ACT_DYNAMIC),),
    platforms={"cuda"},
    capabilities=("sm100+",),
    dtypes={"bfloat16"},
    k_multiple_of=64,
    priority=20,
)


def _kernels() -> Kernels:  # called on the first prepare, not when the plugin is imported
    from quantoracle.backends.reference.linear import linear
    from quantoracle.backends.reference.moe import fused_moe

    return Kernels(prepare_linear=_unchanged, linear=linear, prepare_moe=_unchanged, fused_moe=fused_moe)


def _unchanged(weights):
    return weights  # a real kernel re-lays the checkpoint's tensors here, once per layer


@hookimpl
def quantoracle_backends():
    return [KernelBackend(SPEC, _kernels)]
