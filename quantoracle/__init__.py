"""quantoracle: pick and run the right kernel for a quantized LLM layer, and explain the choice.

- :mod:`quantoracle.schemes`: what is quantized and how (keys, schemes, NVFP4 numerics, checkpoints).
- :mod:`quantoracle.oracle`: which backend serves a layer (:func:`resolve`), and why not the others.
- :mod:`quantoracle.backends`: the kernels (torch reference, Triton NVFP4).
- :mod:`quantoracle.layers`: ``torch.nn.Module`` front ends.
"""

from quantoracle._version import __version__
from quantoracle.errors import (
    CheckpointFormatError,
    NumericsError,
    PluginError,
    ProblemError,
    QuantoracleError,
    SchemeError,
)
from quantoracle.oracle import (
    Device,
    ForcedBackendError,
    NoBackendError,
    ParallelConfig,
    Plan,
    Problem,
    Resolution,
    plan,
    resolve,
)
from quantoracle.schemes import *  # noqa: F403  (the keys and schemes)
from quantoracle.schemes import __all__ as _schemes_all


def __getattr__(name: str):
    # The layers and the checkpoint reader import more of torch: load them on first use.
    if name in ("NVFP4Linear", "NVFP4FusedMoE"):
        from quantoracle import layers

        return getattr(layers, name)
    if name == "load_checkpoint":
        from quantoracle.schemes.checkpoint import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'quantoracle' has no attribute {name!r}")


__all__ = [
    *_schemes_all, "__version__",
    "CheckpointFormatError", "Device", "ForcedBackendError", "NoBackendError", "NumericsError",
    "NVFP4FusedMoE", "NVFP4Linear", "ParallelConfig", "Plan", "PluginError", "Problem", "ProblemError",
    "QuantoracleError", "Resolution", "SchemeError", "load_checkpoint", "plan", "resolve",
]
