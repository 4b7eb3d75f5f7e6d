"""The vocabulary of quantization: scalar types, scale group shapes, scale descriptions, keys.

A :class:`QuantKey` says how one tensor (weights or activations) is quantized: its element type and
how its scales are laid out. Keys are frozen pydantic models: hashable, comparable, and they
round-trip through JSON (``model_dump_json`` / ``model_validate_json``).
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, field_validator, model_validator


class ScalarType(str, Enum):
    """Element types of quantized tensors and of their scales."""

    fp4_e2m1 = "fp4_e2m1"
    fp8_e4m3 = "fp8_e4m3"
    fp8_e5m2 = "fp8_e5m2"
    e8m0 = "e8m0"  # power-of-two scale (MX formats)
    int4 = "int4"
    uint4 = "uint4"
    int8 = "int8"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"

    @property
    def is_quantized(self) -> bool:
        """True for element types that need a scale to mean anything."""
        return self not in (ScalarType.float16, ScalarType.bfloat16, ScalarType.float32)

    def __str__(self) -> str:
        return self.value


SCALE_TYPES = frozenset(
    {ScalarType.fp8_e4m3, ScalarType.e8m0, ScalarType.float16, ScalarType.bfloat16, ScalarType.float32}
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GroupShape(_Frozen):
    """How many elements share one scale: ``rows`` x ``cols`` of the tensor's last two dims.

    ``-1`` means the whole extent: ``GroupShape(-1, -1)`` is per tensor, ``(1, -1)`` per row
    (per token for activations ``[M, K]``, per channel for weights ``[N, K]``), ``(1, 16)`` a
    block of 16 along K.
    """

    rows: int
    cols: int

    @field_validator("rows", "cols")
    @classmethod
    def _extent(cls, v: int, info) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"{info.field_name}={v}: a group extent is a positive count or -1 (whole)")
        return v

    def __str__(self) -> str:
        if (self.rows, self.cols) == (-1, -1):
            return "tensor"
        if (self.rows, self.cols) == (1, -1):
            return "row"
        part = lambda v: "all" if v == -1 else str(v)  # noqa: E731
        return f"{part(self.rows)}x{part(self.cols)}"


PER_TENSOR = GroupShape(rows=-1, cols=-1)
PER_ROW = GroupShape(rows=1, cols=-1)


class ScaleDesc(_Frozen):
    """One level of scales: their type, the group each one covers, and whether they are fixed in
    the checkpoint (static) or computed from the data at run time (dynamic)."""

    dtype: ScalarType
    group: GroupShape
    static: bool

    @field_validator("dtype")
    @classmethod
    def _scale_type(cls, v: ScalarType) -> ScalarType:
        if v not in SCALE_TYPES:
            allowed = ", ".join(sorted(t.value for t in SCALE_TYPES))
            raise ValueError(f"dtype={v.value} cannot hold scales; use one of {allowed}")
        return v

    def __str__(self) -> str:
        return f"{self.dtype} per {self.group} {'static' if self.static else 'dynamic'}"


class QuantKey(_Frozen):
    """How one tensor is quantized.

    - ``dtype``: the element type.
    - ``scale``: the (first-level) scales; required for every quantized element type.
    - ``scale2``: a second, coarser level (NVFP4's per-tensor FP32 global scale), or ``None``.
    - ``symmetric``: no zero point.
    """

    dtype: ScalarType
    scale: ScaleDesc | None = None
    scale2: ScaleDesc | None = None
    symmetric: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "QuantKey":
        if self.dtype.is_quantized and self.scale is None:
            raise ValueError(f"scale: dtype={self.dtype.value} is quantized and needs a scale")
        if not self.dtype.is_quantized:
            raise ValueError(
                f"dtype={self.dtype.value}: a QuantKey describes a quantized tensor; "
                "16-bit activations are written as activation=None in a Scheme"
            )
        if self.scale2 is not None and self.scale is None:
            raise ValueError("scale2: a second-level scale needs a first-level scale")
        return self

    def __str__(self) -> str:
        text = f"{self.dtype}[{self.scale}"
        if self.scale2 is not None:
            text += f"; {self.scale2}"
        text += "]" if self.symmetric else ", asymmetric]"
        return text


def key(dtype: ScalarType, scale: ScaleDesc, scale2: ScaleDesc | None = None) -> QuantKey:
    """Shorthand used for the named keys below."""
    return QuantKey(dtype=dtype, scale=scale, scale2=scale2)


def _scale(dtype: ScalarType, rows: int, cols: int, static: bool) -> ScaleDesc:
    return ScaleDesc(dtype=dtype, group=GroupShape(rows=rows, cols=cols), static=static)


_F32_GLOBAL = _scale(ScalarType.float32, -1, -1, True)
NVFP4_BLOCK = 16

NVFP4_WEIGHT = key(ScalarType.fp4_e2m1, _scale(ScalarType.fp8_e4m3, 1, NVFP4_BLOCK, True), _F32_GLOBAL)
NVFP4_ACT_DYNAMIC = key(
    ScalarType.fp4_e2m1, _scale(ScalarType.fp8_e4m3, 1, NVFP4_BLOCK, False), _F32_GLOBAL
)
MXFP4_WEIGHT = key(ScalarType.fp4_e2m1, _scale(ScalarType.e8m0, 1, 32, True))
FP8_WEIGHT_PER_TENSOR = key(ScalarType.fp8_e4m3, _scale(ScalarType.float32, -1, -1, True))
FP8_WEIGHT_PER_CHANNEL = key(ScalarType.fp8_e4m3, _scale(ScalarType.float32, 1, -1, True))
FP8_WEIGHT_BLOCK128 = key(ScalarType.fp8_e4m3, _scale(ScalarType.float32, 128, 128, True))
FP8_ACT_PER_TENSOR_STATIC = key(ScalarType.fp8_e4m3, _scale(ScalarType.float32, -1, -1, True))
FP8_ACT_PER_TOKEN_DYNAMIC = key(ScalarType.fp8_e4m3, _scale(ScalarType.float32, 1, -1, False))
FP8_ACT_BLOCK128_DYNAMIC = key(ScalarType.fp8_e4m3, _scale(ScalarType.float32, 1, 128, False))
INT4_WEIGHT_GROUP128 = key(ScalarType.int4, _scale(ScalarType.bfloat16, 1, 128, True))

KEY_NAMES: dict[QuantKey, str] = {}
for _name, _value in list(globals().items()):
    if isinstance(_value, QuantKey):
        KEY_NAMES.setdefault(_value, _name)

__all__ = [
    "ScalarType",
    "GroupShape",
    "ScaleDesc",
    "QuantKey",
    "PER_TENSOR",
    "PER_ROW",
    "NVFP4_BLOCK",
    "NVFP4_WEIGHT",
    "NVFP4_ACT_DYNAMIC",
    "MXFP4_WEIGHT",
    "FP8_WEIGHT_PER_TENSOR",
    "FP8_WEIGHT_PER_CHANNEL",
    "FP8_WEIGHT_BLOCK128",
    "FP8_ACT_PER_TENSOR_STATIC",
    "FP8_ACT_PER_TOKEN_DYNAMIC",
    "FP8_ACT_BLOCK128_DYNAMIC",
    "INT4_WEIGHT_GROUP128",
]
