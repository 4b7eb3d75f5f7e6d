"""A :class:`Scheme` is what a quantized layer is: a weight key and an activation key, or ``None``
for 16-bit activations (weight-only). Schemes have short names (``"w4a16_nvfp4"``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from quantoracle.errors import SchemeError
from quantoracle.schemes import keys as k
from quantoracle.schemes.keys import QuantKey


class Scheme(BaseModel):
    """``weight`` key and ``activation`` key; ``activation=None`` means the layer computes with
    16-bit (bf16/fp16/fp32) activations and only the weights are quantized."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weight: QuantKey
    activation: QuantKey | None = None

    @property
    def weight_only(self) -> bool:
        return self.activation is None

    def as_weight_only(self) -> "Scheme":
        """The same weights served with 16-bit activations (the activation override)."""
        return Scheme(weight=self.weight)

    @property
    def name(self) -> str:
        """The registered short name, or a descriptive one built from the keys."""
        return _NAME_OF.get(self) or f"w:{self.weight}|a:{self.activation or '16bit'}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def from_name(cls, name: str) -> "Scheme":
        """``Scheme.from_name("w4a16_nvfp4")``; case-insensitive. Raises :class:`SchemeError`
        listing the known names."""
        if not isinstance(name, str):
            raise SchemeError(f"scheme name {name!r} is not a string; known: {', '.join(SCHEMES)}")
        try:
            return SCHEMES[name.lower()]
        except KeyError:
            raise SchemeError(
                f"unknown scheme name {name!r}; known: {', '.join(SCHEMES)}"
            ) from None


W4A16_NVFP4 = Scheme(weight=k.NVFP4_WEIGHT)
W4A4_NVFP4 = Scheme(weight=k.NVFP4_WEIGHT, activation=k.NVFP4_ACT_DYNAMIC)
W4A16_MXFP4 = Scheme(weight=k.MXFP4_WEIGHT)
W8A8_FP8 = Scheme(weight=k.FP8_WEIGHT_PER_TENSOR, activation=k.FP8_ACT_PER_TENSOR_STATIC)
W8A8_FP8_DYNAMIC = Scheme(weight=k.FP8_WEIGHT_PER_CHANNEL, activation=k.FP8_ACT_PER_TOKEN_DYNAMIC)
W8A8_FP8_BLOCK = Scheme(weight=k.FP8_WEIGHT_BLOCK128, activation=k.FP8_ACT_BLOCK128_DYNAMIC)
W8A16_FP8 = Scheme(weight=k.FP8_WEIGHT_PER_CHANNEL)
W4A16_INT4 = Scheme(weight=k.INT4_WEIGHT_GROUP128)

SCHEMES: dict[str, Scheme] = {
    "w4a16_nvfp4": W4A16_NVFP4,
    "w4a4_nvfp4": W4A4_NVFP4,
    "w4a16_mxfp4": W4A16_MXFP4,
    "w8a8_fp8": W8A8_FP8,
    "w8a8_fp8_dynamic": W8A8_FP8_DYNAMIC,
    "w8a8_fp8_block": W8A8_FP8_BLOCK,
    "w8a16_fp8": W8A16_FP8,
    "w4a16_int4": W4A16_INT4,
}
_NAME_OF: dict[Scheme, str] = {scheme: name for name, scheme in SCHEMES.items()}
