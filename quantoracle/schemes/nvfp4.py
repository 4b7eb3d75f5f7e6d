"""NVFP4 numerics: the E2M1 code, packing, and ModelOpt's quantize / dequantize, bit for bit.

Every function is vectorized torch, works on any device and any leading dims, and follows
docs/numerics.md, which cites the ModelOpt and vLLM source:

- An E2M1 code is ``sign << 3 | index`` into :data:`E2M1_VALUES`; 0x8 is -0 and decodes to 0.
- Two codes per byte along K, the last dim: byte j = code[2j] | code[2j+1] << 4.
- A block is 16 consecutive elements along K; each has one float8_e4m3fn scale. A tensor also has
  a float32 global scale (ModelOpt's ``weight_scale_2`` / ``input_scale``).

Weights (:func:`quantize_weight`) follow ModelOpt's export; activations
(:func:`quantize_activation`) follow vLLM's ``ref_nvfp4_quant``. The two rules differ on purpose.
Every function raises :class:`~quantoracle.errors.NumericsError` for NaN or Inf values, K not a
multiple of 16, and wrong dtypes.
"""

from __future__ import annotations

import torch

from quantoracle.errors import NumericsError

BLOCK = 16
"""Elements along K that share one block scale."""

E2M1_MAX = 6.0
FP8_E4M3_MAX = 448.0
GLOBAL_SCALE_DIVISOR = E2M1_MAX * FP8_E4M3_MAX  # 2688: amax / 2688 maps amax onto 6 * 448
MIN_BLOCK_SCALE = 2.0**-9  # the smallest positive float8_e4m3fn (a subnormal)

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float32)
"""float32 ``[8]``: the magnitude of each 3-bit E2M1 index."""

_SIGNED_VALUES = torch.cat([E2M1_VALUES, -E2M1_VALUES])  # indexed by code 0..15
_SIGNED_VALUES[8] = 0.0  # code 0x8 (-0) decodes to +0.0, as in ModelOpt's table
_MIN_SCALE = torch.finfo(torch.float32).tiny  # global scales must be normal: see _as_scale
# Each bound between E2M1 magnitudes adds one index step; a value exactly at a bound rounds up
# (`>=`) when that lands on the even index, else down (`>`): round half to even.
_INDEX_STEPS = (
    (0.25, False),
    (0.75, True),
    (1.25, False),
    (1.75, True),
    (2.5, False),
    (3.5, True),
    (5.0, False),
)
_ONE_SIXTH = torch.tensor(1.0 / 6.0, dtype=torch.float32)
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _require_dtype(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise NumericsError(f"{name} must be {allowed}, found {t.dtype}; convert it with .to(...)")


def _require_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NumericsError(
            f"{name} holds NaN or Inf values, which NVFP4 cannot represent; "
            "find where they come from (a diverged calibration, a corrupt file) and fix it there"
        )


def _require_blocks(name: str, t: torch.Tensor) -> None:
    if t.dim() < 1 or t.shape[-1] % BLOCK:
        k = t.shape[-1] if t.dim() else "a scalar"
        raise NumericsError(
            f"{name}: K (the last dim) = {k} is not a multiple of {BLOCK}; NVFP4 quantizes "
            f"blocks of {BLOCK} along K, so pad K or leave this layer unquantized"
        )


def _as_scale(name: str, value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A float32 global scale on ``like``'s device, checked to be a positive normal float.

    Normal (>= 2^-126) keeps ``float(s) * scale`` away from 0 for every block scale s >= 2^-9
    and keeps ``1 / scale`` finite.
    """
    t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    if not t.dtype.is_floating_point:
        raise NumericsError(f"{name} must be a float32 tensor or a float, found {t.dtype}")
    t = t.to(device=like.device, dtype=torch.float32)
    _require_finite(name, t)
    if not bool((t >= _MIN_SCALE).all()):
        raise NumericsError(
            f"{name} must be a positive normal float32 (>= {_MIN_SCALE:.3g}), found "
            f"{t.min().item()}; a zero scale comes from an all-zero tensor: re-export it"
        )
    return t


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """The E2M1 code (uint8 0..15, same shape) of each value of a float tensor.

    The index is rounded half to even on the grid 0, 0.5, 1, 1.5, 2, 3, 4, 6 (ties at 0.25 -> 0,
    0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), |x| > 5 saturates to 6, and the
    sign bit is ``x < 0`` (so -0.1 is 0x8 and -0.0 is 0x0). Raises NumericsError for NaN or Inf.
    """
    if not x.dtype.is_floating_point:
        raise NumericsError(f"encode_e2m1 needs a float tensor, found {x.dtype}")
    _require_finite("encode_e2m1 input", x)
    a = x.abs()
    index = torch.zeros_like(a, dtype=torch.uint8)
    for bound, up_at_tie in _INDEX_STEPS:
        index += (a >= bound) if up_at_tie else (a > bound)
    return index | ((x < 0).to(torch.uint8) << 3)


def _require_codes(name: str, codes: torch.Tensor) -> None:
    _require_dtype(name, codes, (torch.uint8,))
    if codes.numel() and int(codes.max()) > 15:
        raise NumericsError(f"{name} holds values above 15; E2M1 codes are 4-bit (0..15)")


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """float32 values (same shape) of uint8 E2M1 codes 0..15; code 0x8 (-0) decodes to +0.0."""
    _require_codes("decode_e2m1 codes", codes)
    return _SIGNED_VALUES.to(codes.device)[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K/2]`` from codes uint8 ``[..., K]`` (K even): element 2i in the low nibble."""
    _require_codes("pack_fp4 codes", codes)
    if codes.dim() < 1 or codes.shape[-1] % 2:
        raise NumericsError(f"pack_fp4 needs an even last dim, found shape {tuple(codes.shape)}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Codes uint8 ``[..., 2*P]`` from packed uint8 ``[..., P]``: the inverse of pack_fp4."""
    _require_dtype("unpack_fp4 packed", packed, (torch.uint8,))
    if packed.dim() < 1:
        raise NumericsError("unpack_fp4 needs at least one dim (the packed K/2)")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """float32 0-dim ``amax / 2688`` (one fp32 division), or 1.0 where amax == 0.

    ModelOpt would write 0 for an all-zero tensor (and NaN block scales); docs/numerics.md
    writes 1.0 instead. Raises NumericsError for a negative, NaN or Inf amax, or a positive one
    so small (below about 3e-35) that the scale is not a normal float32.
    """
    a = amax if isinstance(amax, torch.Tensor) else torch.tensor(float(amax))
    if not a.dtype.is_floating_point or a.numel() != 1:
        raise NumericsError(f"amax must be one float, found {a.dtype} {tuple(a.shape)}")
    a = a.reshape(()).float()
    _require_finite("amax", a)
    if bool(a < 0):
        raise NumericsError(f"amax must be >= 0 (a maximum of |x|), found {a.item()}")
    if bool(a == 0):
        return torch.ones((), dtype=torch.float32, device=a.device)
    scale = a / GLOBAL_SCALE_DIVISOR
    if bool(scale < _MIN_SCALE):
        raise NumericsError(
            f"amax {a.item()} is too small for a normal float32 global scale; "
            "leave this tensor unquantized"
        )
    return scale


def quantize_weight(
    w: torch.Tensor, scale_2: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a weight ``[..., N, K]`` as ModelOpt exports it, byte for byte.

    Returns ``(packed, block_scale, scale_2)``: uint8 ``[..., N, K/2]``, float8_e4m3fn
    ``[..., N, K/16]`` and float32 0-dim. ``scale_2`` defaults to ``global_scale(amax(|w|))``;
    pass one to share it over a fused group (q/k/v, an expert's gate and up: their max amax).

    All arithmetic is float32 on the upcast input (bf16 and fp16 give their fp32 upcast's bytes):

    1. ``s = amax_block / (6 * scale_2)``: the product rounded first, then one division;
    2. ``s == 0 -> 1.0``, clamp to ``[2^-9, 448]``, cast to float8_e4m3fn (round to nearest even);
    3. ``code = encode_e2m1(w / (float(s) * scale_2))``: the product first, then one division.

    Raises NumericsError for a dtype other than float32/bfloat16/float16, fewer than 2 dims,
    K % 16 != 0, NaN or Inf in ``w``, or a ``scale_2`` that is not one positive finite float.
    """
    _require_dtype("weight", w, _WEIGHT_DTYPES)
    if w.dim() < 2:
        raise NumericsError(f"weight must be [..., N, K], found shape {tuple(w.shape)}")
    _require_blocks("weight", w)
    _require_finite("weight", w)
    w = w.float()
    if scale_2 is None:
        scale_2 = global_scale(w.abs().amax() if w.numel() else 0.0).to(w.device)
    else:
        scale_2 = _as_scale("scale_2", scale_2, w)
        if scale_2.numel() != 1:
            raise NumericsError(
                f"scale_2 must be one value (0-dim), found shape {tuple(scale_2.shape)}; "
                "quantize each tensor with its own scale_2 instead"
            )
        scale_2 = scale_2.reshape(())
    blocks = w.unflatten(-1, (-1, BLOCK))
    s = blocks.abs().amax(-1) / (6.0 * scale_2)
    s = torch.where(s == 0, 1.0, s).clamp(MIN_BLOCK_SCALE, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    q = blocks / (s.float() * scale_2).unsqueeze(-1)
    return pack_fp4(encode_e2m1(q.flatten(-2))), s, scale_2


def _require_scales(packed: torch.Tensor, block_scale: torch.Tensor) -> None:
    _require_dtype("packed", packed, (torch.uint8,))
    _require_dtype("block_scale", block_scale, (torch.float8_e4m3fn,))
    if (
        packed.dim() < 1
        or block_scale.shape[:-1] != packed.shape[:-1]
        or (block_scale.shape[-1] * (BLOCK // 2) != packed.shape[-1])
    ):
        raise NumericsError(
            f"packed {tuple(packed.shape)} and block_scale {tuple(block_scale.shape)} disagree: "
            f"expected packed [..., K/2] and block_scale [..., K/{BLOCK}]"
        )
    if bool(((block_scale.view(torch.uint8) & 0x7F) == 0x7F).any()):
        raise NumericsError(
            "block_scale holds NaN (bytes 0x7F/0xFF); the tensor was exported from an all-zero or "
            "corrupt weight: re-export it (quantoracle writes 0x38 for all-zero blocks)"
        )


def _scale_blocks(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``e2m1(code) * scale`` per block of 16 (``scale`` ``[..., K/16]``, fp32), cast to dtype."""
    values = decode_e2m1(codes).unflatten(-1, (-1, BLOCK))
    return (values * scale.unsqueeze(-1)).flatten(-2).to(dtype)


def dequantize(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    scale_2: torch.Tensor | float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The values ``[..., N, K]`` of a quantized weight, ``e2m1(code) * (float(s) * scale_2)``.

    ``packed`` uint8 ``[..., N, K/2]``, ``block_scale`` float8_e4m3fn ``[..., N, K/16]``,
    ``scale_2`` float32 broadcastable against ``[..., N, 1]`` (0-dim, or one per row). The product
    ``float(s) * scale_2`` is rounded to fp32 first (ModelOpt's and vLLM's order), so the float32
    result is exact; other dtypes are a cast of it. Raises NumericsError for wrong dtypes,
    disagreeing shapes, NaN block scales, or a scale_2 that is not positive and finite.
    """
    _require_scales(packed, block_scale)
    scale_2 = _as_scale("scale_2", scale_2, packed)
    return _scale_blocks(unpack_fp4(packed), block_scale.float() * scale_2, dtype)


def _activation_blocks(
    x: torch.Tensor, input_scale: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/numerics.md: codes ``[..., K]``, block scales float8 ``[..., K/16, 1]`` and
    ``gs = 1 / input_scale`` shaped to broadcast against ``[..., K/16, 1]``."""
    _require_dtype("activation", x, _WEIGHT_DTYPES)
    _require_blocks("activation", x)
    _require_finite("activation", x)
    gs = 1.0 / _as_scale("input_scale", input_scale, x)
    gs = gs.unsqueeze(-1) if gs.dim() else gs  # [..., 1] -> [..., 1, 1]
    blocks = x.float().unflatten(-1, (-1, BLOCK))
    amax = blocks.abs().amax(-1, keepdim=True)
    s = (gs * (amax * _ONE_SIXTH.to(x.device))).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    sf = s.float()
    r = torch.where(sf == 0, 0.0, 1.0 / (sf * (1.0 / gs)))
    codes = encode_e2m1((blocks * r).clamp(-E2M1_MAX, E2M1_MAX).flatten(-2))
    return codes, s, gs


def quantize_activation(
    x: torch.Tensor, input_scale: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations ``[..., K]`` per token per 16, as vLLM's ``ref_nvfp4_quant`` does.

    Returns ``(packed uint8 [..., K/2], block_scale float8_e4m3fn [..., K/16])``. ``input_scale``
    is ModelOpt's static ``input_scale`` (float32, 0-dim or broadcastable against ``[..., 1]``).
    With ``gs = 1 / input_scale`` (fp32), per block:
    ``s = fp8(min(gs * (amax * fp32(1/6)), 448))``, ``r = 1 / (float(s) * (1 / gs))`` (0 where
    s == 0), ``code = encode_e2m1(clamp(x * r, -6, 6))``. Unlike weights, an all-zero block stores
    scale 0x00 and there is no 2^-9 floor. Raises NumericsError like :func:`quantize_weight`, and
    for an input_scale that is not positive, or whose reciprocal overflows.
    """
    codes, s, _ = _activation_blocks(x, input_scale)
    return pack_fp4(codes), s.squeeze(-1)


def fake_quantize_activation(x: torch.Tensor, input_scale: torch.Tensor | float) -> torch.Tensor:
    """float32 ``[..., K]``: ``x`` quantized by :func:`quantize_activation`, then dequantized.

    The dequantization is vLLM's ``ref_nvfp4_quant_dequant`` order,
    ``e2m1(code) * (float(s) / gs)`` with ``gs = 1 / input_scale`` (one fp32 division per block,
    then one product), so W4A4 emulation matches vLLM's reference exactly.
    """
    codes, s, gs = _activation_blocks(x, input_scale)
    return _scale_blocks(codes, (s.float() / gs).squeeze(-1), torch.float32)


__all__ = [
    "BLOCK",
    "E2M1_VALUES",
    "encode_e2m1",
    "decode_e2m1",
    "pack_fp4",
    "unpack_fp4",
    "global_scale",
    "quantize_weight",
    "dequantize",
    "quantize_activation",
    "fake_quantize_activation",
]
