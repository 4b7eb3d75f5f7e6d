"""What is quantized and how: keys, schemes, NVFP4 numerics, checkpoint formats.

Pure data and numerics; this package knows nothing of backends or of the oracle.
"""

from quantoracle.schemes.keys import (
    FP8_ACT_BLOCK128_DYNAMIC,
    FP8_ACT_PER_TENSOR_STATIC,
    FP8_ACT_PER_TOKEN_DYNAMIC,
    FP8_WEIGHT_BLOCK128,
    FP8_WEIGHT_PER_CHANNEL,
    FP8_WEIGHT_PER_TENSOR,
    INT4_WEIGHT_GROUP128,
    MXFP4_WEIGHT,
    NVFP4_ACT_DYNAMIC,
    NVFP4_WEIGHT,
    GroupShape,
    QuantKey,
    ScalarType,
    ScaleDesc,
)
from quantoracle.schemes.scheme import (
    SCHEMES,
    W4A4_NVFP4,
    W4A16_INT4,
    W4A16_MXFP4,
    W4A16_NVFP4,
    W8A8_FP8,
    W8A8_FP8_BLOCK,
    W8A8_FP8_DYNAMIC,
    W8A16_FP8,
    Scheme,
)

__all__ = [
    "ScalarType", "GroupShape", "ScaleDesc", "QuantKey", "Scheme", "SCHEMES",
    "NVFP4_WEIGHT", "NVFP4_ACT_DYNAMIC", "MXFP4_WEIGHT", "FP8_WEIGHT_PER_TENSOR",
    "FP8_WEIGHT_PER_CHANNEL", "FP8_WEIGHT_BLOCK128", "FP8_ACT_PER_TENSOR_STATIC",
    "FP8_ACT_PER_TOKEN_DYNAMIC", "FP8_ACT_BLOCK128_DYNAMIC", "INT4_WEIGHT_GROUP128",
    "W4A16_NVFP4", "W4A4_NVFP4", "W4A16_MXFP4", "W8A8_FP8", "W8A8_FP8_DYNAMIC",
    "W8A8_FP8_BLOCK", "W8A16_FP8", "W4A16_INT4",
]
