"""NVFP4 numerics: worked bytes from FORMATS.md section 6, then the invariants as properties."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantoracle.errors import NumericsError
from quantoracle.schemes import nvfp4

SCALE_2_OF_AMAX_1 = 0x39C30C31  # fp32 bits of 1/2688 = 3.7202382e-4


def row_with_global_amax(block, amax: float = 1.0) -> torch.Tensor:
    """[1, 32]: the block under test, then a block holding the row's (global) amax."""
    other = torch.zeros(16)
    other[0] = amax
    return torch.cat([torch.as_tensor(block, dtype=torch.float32), other])[None]


# (block, global amax, scale byte, packed bytes) from FORMATS.md section 6 (MO columns).
WORKED = [
    # scale_2 = 1/2688. s = 0.5 / (6 * scale_2) = 0.5 * 448 = 224 -> fp8 224 = 1.75 * 2^7 = 0x76.
    # q = w / (224 / 2688) = 12 w: 0, .12, -.24, .36, .6, -.84, 1.2, 1.56, -2.04, 2.4, 3, -3.6,
    # 4.2, 4.8, -5.4, 6 -> 0, 0, -0(8), .5(1), .5(1), -1(a), 1(2), 1.5(3), -2(c), 2(4), 3(5),
    # -4(e), 4(6), 4(6), -6(f), 6(7); pairs (low, high): 00 18 a1 32 4c e5 66 7f.
    (
        [
            0,
            0.01,
            -0.02,
            0.03,
            0.05,
            -0.07,
            0.1,
            0.13,
            -0.17,
            0.2,
            0.25,
            -0.3,
            0.35,
            0.4,
            -0.45,
            0.5,
        ],
        1.0,
        0x76,
        "00 18 a1 32 4c e5 66 7f",
    ),
    # scale_2 = 2688/2688 = 1, s = 6 / 6 = 1.0 = 0x38, q = w. Ties go to the even index:
    # .25->0(0) .75->1(2) 1.25->1(2) 1.75->2(4) 2.5->2(4) 3.5->4(6) 5->4(6) 6(7), negatives +8.
    (
        [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, 0],
        2688.0,
        0x38,
        "20 42 64 76 a8 ca ec 0e",
    ),
    # An all-zero block: s = 0 -> 1.0 (0x38), every code 0.
    ([0.0] * 16, 1.0, 0x38, "00 00 00 00 00 00 00 00"),
    # s = 1e-6 * 448 = 4.5e-4 < 2^-10: clamped up to 2^-9 (0x01), so q = w * 2688 * 512 =
    # w * 1.376e6: -1.376 (-1.5: b), -1.193 (-1: a), ... -0.092 (-0: 8), 0.092 (0), ... 1.376 (3).
    (torch.linspace(-1e-6, 1e-6, 16), 1.0, 0x01, "ab aa 99 89 10 11 22 32"),
    # amax_block = 6 * 2^-9 / 448 -> s = 6 * 2^-9, the subnormal fp8 0x06; q = 6 * linspace(-1, 1).
    (torch.linspace(-1, 1, 16) * (6 * 2**-9 / 448), 1.0, 0x06, "ff ee cd 9a 21 54 66 77"),
    # s = 0.47 * 448 = 210.56 -> fp8 208 (0x75, step 16 there): q = 0.47 * 2688 / 208 = 6.07 and
    # 0.465 * 12.92 = 6.009, both > 5 -> 6 (7): the block scale rounded down and q saturates.
    ([0.47] + [0.465] * 15, 1.0, 0x75, "77 77 77 77 77 77 77 77"),
]


@pytest.mark.parametrize("block, amax, scale_byte, packed_hex", WORKED)
def test_worked_bytes_match_modelopt(block, amax, scale_byte, packed_hex):
    packed, block_scale, scale_2 = nvfp4.quantize_weight(row_with_global_amax(block, amax))
    assert block_scale.view(torch.uint8)[0, 0].item() == scale_byte
    assert bytes(packed[0, :8].tolist()).hex(" ") == packed_hex
    assert scale_2.dtype == torch.float32 and scale_2.shape == ()
    expected_bits = 0x3F800000 if amax == 2688.0 else SCALE_2_OF_AMAX_1  # 1.0 or 1/2688
    assert scale_2.view(torch.int32).item() == expected_bits


def test_bf16_weights_give_the_bytes_of_their_fp32_upcast():
    w = (torch.randn(8, 64, generator=torch.Generator().manual_seed(5)) * 0.02).bfloat16()
    (pa, sa, ga), (pb, sb, gb) = nvfp4.quantize_weight(w), nvfp4.quantize_weight(w.float())
    assert torch.equal(pa, pb) and torch.equal(sa.view(torch.uint8), sb.view(torch.uint8))
    assert ga.item() == gb.item()


def test_all_zero_tensor_writes_scale_one_not_nan():
    packed, block_scale, scale_2 = nvfp4.quantize_weight(torch.zeros(3, 2, 32))
    assert scale_2.item() == 1.0
    assert (block_scale.view(torch.uint8) == 0x38).all() and (packed == 0).all()
    assert block_scale.shape == (3, 2, 2) and packed.shape == (3, 2, 16)


def test_sign_bit_is_q_below_zero():
    codes = nvfp4.encode_e2m1(torch.tensor([-0.1, -0.0, 0.0, 0.1, -7.0, 1e30]))
    assert codes.tolist() == [0x8, 0x0, 0x0, 0x0, 0xF, 0x7]
    assert nvfp4.decode_e2m1(torch.tensor([0x8], dtype=torch.uint8)).item() == 0.0


def test_operation_order_of_block_scale_is_product_first():
    # amax_block / (6 * scale_2) with 6 * scale_2 rounded first: recompute both orders in fp32
    # on random weights and check the module agrees with the product-first one everywhere.
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    _, block_scale, scale_2 = nvfp4.quantize_weight(w)
    amax = w.abs().unflatten(-1, (-1, 16)).amax(-1)
    product_first = (amax / (6.0 * scale_2)).to(torch.float8_e4m3fn)
    assert torch.equal(block_scale.view(torch.uint8), product_first.view(torch.uint8))


def test_shared_scale_2_is_used_as_given():
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    shared = nvfp4.global_scale(w.abs().amax() * 2)
    _, _, scale_2 = nvfp4.quantize_weight(w, scale_2=shared)
    assert scale_2.item() == shared.item()
    assert nvfp4.quantize_weight(w, scale_2=float(shared))[2].item() == shared.item()


# ---- activations (FORMATS.md section 4) ----


def test_activation_worked_bytes():
    # input_scale = 1 -> gs = 1. Ties block: s = fp8(1 * (6 * fp32(1/6))) = fp8(1.0) = 0x38,
    # r = 1 / (1 * 1) = 1, codes as the weight ties row. A zero block stores scale 0x00, codes 0
    # (no 1.0 substitution). A tiny block (amax 1e-5): s = 1e-5 / 6 = 1.7e-6 < 2^-10 -> fp8 0, so
    # r = 0 and every code is 0 (the weight rule would clamp s to 2^-9 instead).
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, 0]
    x = torch.tensor([ties + [0.0] * 16 + [1e-5, -1e-5] * 8])
    packed, block_scale = nvfp4.quantize_activation(x, 1.0)
    assert block_scale.view(torch.uint8).tolist() == [[0x38, 0x00, 0x00]]
    assert bytes(packed[0, :8].tolist()).hex(" ") == "20 42 64 76 a8 ca ec 0e"
    assert (packed[0, 8:] == 0).all()


def test_activation_uses_reciprocals_and_clamps_at_448():
    # input_scale = 1/2688 -> gs = 2688, amax 12: s = 2688 * 2 = 5376 -> clamp 448. Then
    # r = 1 / (448 * (1 / 2688)) = 6: x = 1 -> 6 (7), x = 12 -> 72 -> clamp 6 (7).
    x = torch.tensor([[12.0, 1.0] + [0.0] * 14])
    packed, block_scale = nvfp4.quantize_activation(x, torch.tensor(1 / 2688))
    assert block_scale.float().item() == 448.0
    assert packed[0, 0].item() == 0x77


def test_fake_quantize_activation_is_quantize_then_dequantize():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 64, generator=g).to(torch.bfloat16)
    input_scale = torch.tensor(4.0 / 2688)
    packed, block_scale = nvfp4.quantize_activation(x, input_scale)
    gs = 1.0 / input_scale
    codes = nvfp4.unpack_fp4(packed).unflatten(-1, (-1, 16))
    expected = nvfp4.decode_e2m1(codes) * (block_scale.float() / gs).unsqueeze(-1)
    got = nvfp4.fake_quantize_activation(x, input_scale)
    assert got.dtype == torch.float32 and torch.equal(got, expected.flatten(-2))


def test_activation_per_row_input_scale_matches_row_by_row():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, generator=g)
    scales = torch.tensor([[1e-3], [2e-3], [5e-4], [1e-2]])
    packed, block_scale = nvfp4.quantize_activation(x, scales)
    for i in range(4):
        p, s = nvfp4.quantize_activation(x[i], scales[i, 0])
        assert torch.equal(packed[i], p)
        assert torch.equal(block_scale[i].view(torch.uint8), s.view(torch.uint8))


# ---- properties ----


def nearest_e2m1(value: float) -> float:
    """The nearest E2M1 value, ties to the even index, |x| beyond 6 saturating: by brute force
    in exact rational arithmetic."""
    magnitudes = nvfp4.E2M1_VALUES.tolist()
    distances = [abs(abs(Fraction(value)) - Fraction(m)) for m in magnitudes]
    tied = [i for i, d in enumerate(distances) if d == min(distances)]
    index = tied[0] if len(tied) == 1 else next(i for i in tied if i % 2 == 0)
    return math.copysign(magnitudes[index], value) if magnitudes[index] else 0.0


finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=32)
e2m1_neighbourhood = st.sampled_from(
    [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(finite_floats, e2m1_neighbourhood, e2m1_neighbourhood.map(lambda v: -v)),
        min_size=1,
        max_size=64,
    )
)
def test_decode_encode_is_nearest_with_ties_to_even(values):
    x = torch.tensor(values, dtype=torch.float32)
    codes = nvfp4.encode_e2m1(x)
    decoded = nvfp4.decode_e2m1(codes).tolist()
    assert decoded == [nearest_e2m1(v) for v in x.tolist()]
    assert ((codes >> 3) == (x < 0).to(torch.uint8)).all()


def half_step(q: torch.Tensor) -> torch.Tensor:
    """Half the E2M1 spacing around |q|: 0.25 below 2, 0.5 below 4, 1 from 4 (and saturation)."""
    a = q.abs()
    return torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0)).double()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 4),
    blocks=st.integers(1, 4),
    log_scale=st.floats(-30, 30),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_dequantization_error_is_within_half_a_step(seed, rows, blocks, log_scale, dtype):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, blocks * 16)
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(4)  # varied blocks
    w = (w * 2.0**log_scale).to(dtype)
    if dtype != torch.float32 and not torch.isfinite(w).all():
        return
    packed, block_scale, scale_2 = nvfp4.quantize_weight(w)
    dq = nvfp4.dequantize(packed, block_scale, scale_2)
    step = (block_scale.double() * scale_2.double()).repeat_interleave(16, -1)
    error = (dq.double() - w.double()).abs()
    assert (error <= half_step(w.double() / step) * step * (1 + 1e-6)).all()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_pack_unpack_codes_round_trip(codes):
    c = torch.tensor(codes, dtype=torch.uint8).reshape(1, -1)
    assert torch.equal(nvfp4.unpack_fp4(nvfp4.pack_fp4(c)), c)


def test_pack_unpack_is_a_bijection_on_every_byte():
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(2, 8, 16)
    codes = nvfp4.unpack_fp4(every_byte)
    assert codes.shape == (2, 8, 32) and int(codes.max()) == 15
    assert torch.equal(nvfp4.pack_fp4(codes), every_byte)
    assert codes[0, 0, :4].tolist() == [0, 0, 1, 0]  # byte 0x00, then 0x01: low nibble first


def test_dequantize_accepts_per_row_scale_2():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 32, generator=g), torch.randn(3, 32, generator=g) * 100
    pa, sa, ga = nvfp4.quantize_weight(a)
    pb, sb, gb = nvfp4.quantize_weight(b)
    per_row = torch.cat([ga.expand(2), gb.expand(3)]).unsqueeze(-1)
    dq = nvfp4.dequantize(torch.cat([pa, pb]), torch.cat([sa, sb]), per_row, torch.bfloat16)
    assert dq.dtype == torch.bfloat16
    separately = torch.cat([nvfp4.dequantize(pa, sa, ga), nvfp4.dequantize(pb, sb, gb)])
    assert torch.equal(dq, separately.bfloat16())


# ---- errors ----


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: nvfp4.quantize_weight(torch.tensor([[float("nan")] + [0.0] * 15])), "NaN or Inf"),
        (lambda: nvfp4.quantize_weight(torch.tensor([[float("inf")] + [0.0] * 15])), "NaN or Inf"),
        (lambda: nvfp4.quantize_weight(torch.zeros(2, 24)), "multiple of 16"),
        (lambda: nvfp4.quantize_weight(torch.zeros(32)), r"\[..., N, K\]"),
        (lambda: nvfp4.quantize_weight(torch.zeros(2, 32, dtype=torch.int32)), "int32"),
        (lambda: nvfp4.quantize_weight(torch.ones(2, 32), scale_2=0.0), "positive normal"),
        (lambda: nvfp4.quantize_weight(torch.ones(2, 32), scale_2=float("nan")), "NaN or Inf"),
        (lambda: nvfp4.quantize_weight(torch.ones(2, 32), scale_2=torch.ones(2)), "one value"),
        (lambda: nvfp4.quantize_activation(torch.zeros(2, 20), 1.0), "multiple of 16"),
        (lambda: nvfp4.quantize_activation(torch.zeros(2, 16), -1.0), "positive normal"),
        (lambda: nvfp4.encode_e2m1(torch.tensor([float("nan")])), "NaN or Inf"),
        (lambda: nvfp4.encode_e2m1(torch.tensor([1])), "float tensor"),
        (lambda: nvfp4.decode_e2m1(torch.tensor([16], dtype=torch.uint8)), "above 15"),
        (lambda: nvfp4.pack_fp4(torch.zeros(3, dtype=torch.uint8)), "even last dim"),
        (lambda: nvfp4.unpack_fp4(torch.zeros(3, dtype=torch.int8)), "uint8"),
        (lambda: nvfp4.global_scale(-1.0), ">= 0"),
        (lambda: nvfp4.global_scale(1e-40), "too small"),
    ],
)
def test_bad_input_raises_numerics_error(call, match):
    with pytest.raises(NumericsError, match=match):
        call()


def test_dequantize_rejects_nan_scales_and_mismatched_shapes():
    packed = torch.zeros(2, 8, dtype=torch.uint8)
    nan_scale = torch.full((2, 1), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
    one_scale = torch.ones(2, 1).to(torch.float8_e4m3fn)
    with pytest.raises(NumericsError, match="NaN"):
        nvfp4.dequantize(packed, nan_scale, 1.0)
    with pytest.raises(NumericsError, match="NaN or Inf"):
        nvfp4.dequantize(packed, one_scale, torch.tensor(float("nan")))
    with pytest.raises(NumericsError, match="disagree"):
        nvfp4.dequantize(packed, torch.ones(2, 2).to(torch.float8_e4m3fn), 1.0)
    with pytest.raises(NumericsError, match="float8_e4m3fn"):
        nvfp4.dequantize(packed, torch.ones(2, 1), 1.0)
