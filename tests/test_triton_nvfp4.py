"""The Triton NVFP4 kernels against the reference backend.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before the
kernel modules are imported) on tiny ragged shapes with fp16 activations (the interpreter
computes bf16 dots wrongly); with a GPU the same tests run compiled, in bf16 too.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from quantoracle.backends.reference import linear as reference_linear
from quantoracle.backends.reference import moe as reference_moe
from quantoracle.backends.triton_nvfp4 import CONSTRAINTS, align, configs, gemm, layout, moe
from quantoracle.errors import NumericsError
from quantoracle.schemes import nvfp4
from quantoracle.schemes.tensors import MoEWeights, NVFP4Tensor

ON_GPU = torch.cuda.is_available()
# tests/conftest.py sets TRITON_INTERPRET=1 before any kernel module is imported
assert ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # ||out - ref|| / ||ref||


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


def _random_fp4(lead: tuple[int, ...], rows: int, cols: int, *, odd_scales: bool) -> NVFP4Tensor:
    """Random codes and block scales (no quantizer): every code, and with ``odd_scales``
    subnormal, zero and negative block scales too."""
    g = torch.Generator().manual_seed(rows * 7919 + cols)
    packed = torch.randint(0, 256, (*lead, rows, cols // 2), dtype=torch.uint8, generator=g)
    scale_bytes = torch.randint(0x20, 0x50, (*lead, rows, cols // 16), dtype=torch.uint8,
                                generator=g)
    if odd_scales:
        special = torch.tensor([0x00, 0x01, 0x05, 0x7E, 0xB8, 0x80], dtype=torch.uint8)
        pick = torch.rand(scale_bytes.shape, generator=g) < 0.3
        index = torch.randint(0, len(special), scale_bytes.shape, generator=g)
        scale_bytes = torch.where(pick, special[index], scale_bytes)
    global_scale = torch.rand(*lead, 1, generator=g) * 1e-2 + 1e-3
    return NVFP4Tensor(packed, scale_bytes.view(torch.float8_e4m3fn), global_scale)


def _quantized(lead: tuple[int, ...], rows: int, cols: int, shards: int, w4a4: bool,
               seed: int) -> NVFP4Tensor:
    """ModelOpt-quantized random weights, each row shard with its own global scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*lead, rows, cols, generator=g) * 0.05
    parts = [nvfp4.quantize_weight(m) for m in w.reshape(-1, rows // shards, cols)]
    packed, block_scale, scale_2 = (torch.stack(t) for t in zip(*parts))
    input_scale = None
    if w4a4:
        input_scale = (torch.rand(*lead, shards, generator=g) + 0.5) / 2688.0
    return NVFP4Tensor(
        packed.reshape(*lead, rows, cols // 2),
        block_scale.reshape(*lead, rows, cols // 16),
        scale_2.reshape(*lead, shards),
        input_scale,
    )


def _activations(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, k, generator=g) ** 3  # blocks of mixed range
    return x.to(dtype)


# ----------------------------------------------------------------------------- layout


def test_scale_encoding_is_exact_for_every_positive_e4m3_value():
    values = torch.arange(1, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    encoded = layout.encode_scale(values)
    assert torch.equal(layout.decode_scale(encoded), values)
    bf16 = ((encoded.int() << 4) + (236 << 7)).to(torch.int16).view(torch.bfloat16).float()
    fp16 = ((encoded.int() << 7) + (13 << 10)).to(torch.int16).view(torch.float16).float()
    assert torch.equal(bf16, values * 2.0**118) and torch.equal(fp16, values * 2.0**7)


def test_relayout_round_trips_codes_and_scales():
    weight = _random_fp4((3,), 5, 272, odd_scales=False)
    words, scales = layout.relayout(weight.packed, weight.block_scale)
    assert words.shape == (3, 1, 3, 16, 16) and scales.shape == (3, 3, 5)
    assert torch.equal(layout.unpack_words(words, 5, 272), nvfp4.unpack_fp4(weight.packed))
    assert torch.equal(layout.unpack_scales(scales, 272), weight.block_scale.float())
    # Element k of row r sits in nibble (k % 128) // 16 of word k % 16 of tile (r // 16, k // 128).
    codes = nvfp4.unpack_fp4(weight.packed)[1, 2]
    for k in (0, 15, 16, 127, 128, 200, 271):
        word = int(words[1, 0, k // 128, 2, k % 16]) & 0xFFFFFFFF
        assert (word >> (4 * ((k % 128) // 16))) & 0xF == int(codes[k])


def test_relayout_folds_zero_and_negative_scales_into_the_codes():
    weight = _random_fp4((), 4, 64, odd_scales=True)
    words, scales = layout.relayout(weight.packed, weight.block_scale)
    codes = layout.unpack_words(words, 4, 64)
    values = nvfp4.decode_e2m1(codes).view(4, 4, 16) * layout.unpack_scales(scales, 64)[..., None]
    expected = nvfp4.decode_e2m1(nvfp4.unpack_fp4(weight.packed)).view(4, 4, 16)
    expected = expected * weight.block_scale.float()[..., None]
    assert torch.equal(values, expected)


def test_relayout_rejects_nan_scales():
    weight = _random_fp4((), 2, 32, odd_scales=False)
    bad = weight.block_scale.view(torch.uint8).clone()
    bad[0, 0] = 0x7F
    with pytest.raises(NumericsError, match="NaN"):
        layout.relayout(weight.packed, bad.view(torch.float8_e4m3fn))


# ----------------------------------------------------------------------------- align


@pytest.mark.parametrize("programs", [None, 3])  # 3: the multi-program sort on small inputs
@pytest.mark.parametrize("m, top_k, experts, first, block_m", [
    (5, 2, 4, 0, 16), (33, 3, 6, 2, 16), (1, 8, 16, 0, 16), (70, 4, 8, 3, 32),
    (45, 4, 5, 1, 64),
])
def test_align_groups_local_pairs_by_expert(m, top_k, experts, first, block_m, programs):
    g = torch.Generator().manual_seed(m)
    ids = torch.randint(0, experts + 4, (m, top_k), generator=g).to(DEVICE)
    routing = align.align(ids, experts, first, block_m, programs=programs)
    assert routing.blocks == align.max_blocks(m * top_k, experts, block_m)
    ends = routing.block_ends.cpu()
    used = int(ends[-1])
    assert used <= routing.blocks and (ends.diff() >= 0).all()
    owners = torch.searchsorted(ends, torch.arange(used), right=True)
    flat = ids.flatten().cpu() - first
    seen = []
    for block, slots in enumerate(routing.sorted_pairs.cpu().view(-1, block_m)[:used]):
        for pair in slots[slots < m * top_k].tolist():
            assert flat[pair] == owners[block]
            seen.append(pair)
    local = ((flat >= 0) & (flat < experts)).nonzero().flatten().tolist()
    assert sorted(seen) == local
    # every slot of a used block holds a pair of its expert or the sentinel
    assert ((routing.sorted_pairs.cpu()[:used * block_m] <= m * top_k)
            & (routing.sorted_pairs.cpu()[:used * block_m] >= 0)).all()


def test_sort_programs_grow_with_pairs_and_stay_bounded():
    assert align.sort_programs(8, 256) == 1 and align.sort_programs(2048, 256) == 2
    assert align.sort_programs(32768, 256) == 32 and align.sort_programs(32768, 128) == 32
    assert align.sort_programs(1 << 20, 256) == 64 and align.sort_programs(1 << 20, 8) == 1024


@triton.jit
def _owners_kernel(block_ends_ptr, out_ptr, E, LOG2_E: tl.constexpr):
    block = tl.program_id(0)
    tl.store(out_ptr + block, align.block_expert(block_ends_ptr, block, E, LOG2_E))


@pytest.mark.parametrize("experts", [1, 4, 6])
def test_block_expert_finds_each_blocks_owner(experts):
    g = torch.Generator().manual_seed(experts)
    ends = torch.randint(0, 3, (experts,), generator=g).cumsum(0).to(torch.int32)  # idle ones too
    blocks = int(ends[-1]) + 3
    out = torch.empty(blocks, dtype=torch.int32, device=DEVICE)
    _owners_kernel[(blocks,)](ends.to(DEVICE), out, experts, LOG2_E=experts.bit_length())
    assert torch.equal(out.cpu(), torch.searchsorted(ends, torch.arange(blocks), right=True).int())


# ----------------------------------------------------------------------------- dense


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k", [(1, 40, 48), (17, 72, 272), (5, 64, 1040), (70, 24, 144)])
def test_linear_matches_reference(m, n, k, dtype):
    weight = _quantized((), n, k, 1, False, seed=n + k)
    x = _activations(m, k, dtype, seed=m)
    prepared = gemm.prepare_linear(weight.to(DEVICE))
    out = gemm.linear(x.to(DEVICE), prepared)
    _close(out.cpu(), reference_linear.linear(x.float(), weight), dtype)
    assert torch.equal(out, gemm.linear(x.to(DEVICE), prepared))  # deterministic (split-K too)
    assert not prepared.counters.any()  # split-K counters are left ready for the next call


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_handles_every_code_and_odd_block_scales(dtype):
    weight = _random_fp4((), 48, 160, odd_scales=True)
    x = _activations(3, 160, dtype, seed=3)
    out = gemm.linear(x.to(DEVICE), gemm.prepare_linear(weight.to(DEVICE)))
    _close(out.cpu(), reference_linear.linear(x.float(), weight), dtype)


@pytest.mark.parametrize("m, n, k", [(1, 96, 2064), (20, 40, 144)])  # shards of 48 and 20 rows
def test_linear_w4a4_emulation_per_shard(m, n, k):
    weight = _quantized((), n, k, 2, True, seed=k)
    x = _activations(m, k, torch.float16, seed=k)
    out = gemm.linear(x.to(DEVICE), gemm.prepare_linear(weight.to(DEVICE)),
                      quantize_activations=True)
    ref = reference_linear.linear(x.float(), weight, quantize_activations=True)
    _close(out.cpu(), ref, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k, shards, scratch_rows", [
    (3, 72, 272, 1, 32),  # chunks of 32, 32, 8 rows; K = 128 * 2 + 16
    (9, 120, 144, 2, 16),  # shards of 60 rows with their own global scales: 16, 16, 16, 12
    (5, 40, 256, 2, 64),  # a shard of 20 rows is one chunk
])
def test_linear_large_m_path_matches_reference(m, n, k, shards, scratch_rows, dtype):
    """The dequantize-then-cuBLAS path, forced from M = 1 with a scratch of a few rows."""
    weight = _quantized((), n, k, shards, False, seed=n * k)
    assert shards == 1 or weight.global_scale[0] != weight.global_scale[1]
    x = _activations(m, k, dtype, seed=m)
    prepared = gemm.prepare_linear(weight.to(DEVICE))
    out = gemm.linear(x.to(DEVICE), prepared, dequantize_from_m=1,
                      scratch_bytes=scratch_rows * k * x.element_size())
    ref = reference_linear.linear(x.float(), weight)
    _close(out.cpu(), ref, dtype)
    fused = gemm.linear(x.to(DEVICE), prepared, dequantize_from_m=m + 1)
    assert (out.float() - fused.float()).norm() <= 1e-3 * fused.float().norm()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_kernel_is_exact(dtype):
    """Scratch rows hold ``e2m1 * s * 2^-fold`` exactly, zero/negative/subnormal scales too."""
    weight = _random_fp4((), 40, 176, odd_scales=True)
    prepared = gemm.prepare_linear(weight.to(DEVICE))
    decode = gemm.DECODE[dtype]
    out = torch.full((24, 176), float("nan"), dtype=dtype, device=DEVICE)
    gemm._dequantize_kernel[(3, 2)](
        prepared.words, prepared.scales, out, 13, 24, 176, prepared.words.stride(0),
        prepared.scales.stride(0), out.stride(0), BLOCK_N=16, K_EXACT=False,
        DTYPE=decode.dtype, MAG_SHIFT=decode.mag_shift, SCALE_SHIFT=decode.scale_shift,
        SCALE_BASE=decode.scale_base)
    values = nvfp4.decode_e2m1(nvfp4.unpack_fp4(weight.packed))
    values = values * weight.block_scale.float().repeat_interleave(16, -1) / decode.unfold
    assert torch.equal(out.cpu().float(), values[13:37])


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_linear_large_m_path_is_cuda_graph_capturable():
    prepared = gemm.prepare_linear(_quantized((), 96, 256, 2, False, seed=5).to(DEVICE))
    x = _activations(32, 256, torch.bfloat16, seed=5).to(DEVICE)

    def call():
        return gemm.linear(x, prepared, dequantize_from_m=1, scratch_bytes=32 * 256 * 2)

    eager = call()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    x.copy_(_activations(32, 256, torch.bfloat16, seed=6))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, call()) and not torch.equal(captured, eager)


@triton.jit
def _quantize_blocks_kernel(x_ptr, out_ptr, scale_ptr, M: tl.constexpr):
    offs = tl.arange(0, 16)[:, None] + tl.arange(0, M)[None, :] * 16  # [16, M]: x^T blocks
    gs, inv_gs = gemm.activation_scales(scale_ptr, True)
    q = gemm._fake_quant_block(tl.load(x_ptr + offs), gs, inv_gs, tl.float32)
    tl.store(out_ptr + offs, q)


def test_activation_quantization_matches_nvfp4_exactly():
    """The prologue's codes and block scales are the bytes nvfp4.quantize_activation gives."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g) * torch.rand(64, 1, generator=g) * 10
    x[3] = 0.0  # an all-zero block: scale 0, codes 0
    # Every E2M1 tie (FORMATS.md section 6): with input_scale 1 the block scale is 1.
    x[5] = torch.tensor([.25, .75, 1.25, 1.75, 2.5, 3.5, 5, 6, -.25, -.75, -1.25, -1.75, -2.5,
                         -3.5, -5, 0])
    input_scale = torch.tensor([1.0])
    out = torch.empty_like(x, device=DEVICE)
    _quantize_blocks_kernel[(1,)](x.to(DEVICE), out, input_scale.to(DEVICE), M=64)
    packed, scale = nvfp4.quantize_activation(x, input_scale[0])
    expected = nvfp4.decode_e2m1(nvfp4.unpack_fp4(packed)) * scale.float().repeat_interleave(16, -1)
    assert torch.equal(out.cpu(), expected)


def test_linear_rejects_wrong_dtype_and_k():
    prepared = gemm.prepare_linear(_quantized((), 16, 32, 1, False, seed=1).to(DEVICE))
    with pytest.raises(NumericsError, match="bfloat16 or float16"):
        gemm.linear(torch.zeros(2, 32, device=DEVICE), prepared)
    with pytest.raises(NumericsError, match="K = 48"):
        gemm.linear(torch.zeros(2, 48, dtype=torch.float16, device=DEVICE), prepared)


# ----------------------------------------------------------------------------- fused MoE


def _moe_weights(experts: int, hidden: int, inter: int, first: int, w4a4: bool) -> MoEWeights:
    gate_up = _quantized((experts,), 2 * inter, hidden, 2, w4a4, seed=hidden)  # gate != up scale
    down = _quantized((experts,), hidden, inter, 1, w4a4, seed=inter)
    return MoEWeights(gate_up, down, first)


def _routing(m: int, top_k: int, id_range: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(id_range, generator=g)[:top_k] for _ in range(m)])
    return torch.rand(m, top_k, generator=g), ids


@pytest.mark.parametrize("variant", ["sorted", "unsorted"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, experts, hidden, inter, top_k, first, id_range, activation", [
    (5, 4, 144, 48, 2, 0, 4, "silu"),  # K = 16 * 9 and 16 * 3: padded chunks
    (11, 6, 256, 128, 3, 2, 12, "silu"),  # non-local ids on both sides, idle experts
    (9, 3, 128, 80, 2, 1, 5, "gelu"),
    (2, 24, 48, 32, 17, 0, 24, "silu"),  # top_k 17: 32 slot columns in the down dot
])
def test_fused_moe_matches_reference(m, experts, hidden, inter, top_k, first, id_range,
                                     activation, dtype, variant):
    weights = _moe_weights(experts, hidden, inter, first, False)
    x = _activations(m, hidden, dtype, seed=m)
    topk_weights, topk_ids = _routing(m, top_k, id_range, seed=m)
    prepared = moe.prepare_moe(weights.to(DEVICE))
    out = moe.fused_moe(x.to(DEVICE), prepared, topk_weights.to(DEVICE), topk_ids.to(DEVICE),
                        activation=activation, variant=variant)
    ref = reference_moe.fused_moe(x.float(), weights, topk_weights, topk_ids, activation=activation)
    _close(out.cpu(), ref, dtype)


@pytest.mark.parametrize("up, down", [((128, 4, 4, 3), (128, 4, 4, 1)),  # gate/up K: 3 slices
                                      ((128, 4, 4, 1), (64, 4, 4, 2)),  # down: slot by slot
                                      ((64, 2, 3, 2), (128, 4, 4, 3)),  # both
                                      ((128, 4, 4, 1), (64, 4, 4, 5))])  # down: across slots
def test_fused_moe_unsorted_split_k(monkeypatch, up, down):
    """The unsorted path's slices (H = I = 272: three chunks, the last one ragged; gate/up
    slices of K, down slices of the 2 slots x 3 chunks iterations, some crossing from one
    slot to the next) meet in the last program to arrive; ragged row tiles; counters left at
    zero; deterministic."""
    weights = _moe_weights(5, 272, 272, 1, False)
    x = _activations(3, 272, torch.float16, seed=4)
    topk_weights, topk_ids = _routing(3, 2, 7, seed=4)
    cfg = configs.PairConfig(configs.Tile(*up), configs.Tile(*down))
    monkeypatch.setitem(configs.PAIRS, (5, 272, 272, 2), cfg)
    prepared = moe.prepare_moe(weights.to(DEVICE))
    out = moe.fused_moe(x.to(DEVICE), prepared, topk_weights.to(DEVICE), topk_ids.to(DEVICE),
                        variant="unsorted")
    ref = reference_moe.fused_moe(x.float(), weights, topk_weights, topk_ids)
    _close(out.cpu(), ref, torch.float16)
    assert not prepared.counters.any()
    again = moe.fused_moe(x.to(DEVICE), prepared, topk_weights.to(DEVICE), topk_ids.to(DEVICE),
                          variant="unsorted")
    assert torch.equal(out, again)  # deterministic: slices added in a fixed order


def test_fused_moe_sorted_with_the_multi_program_sort(monkeypatch):
    monkeypatch.setattr(align, "_PAIRS_PER_PROGRAM", 8)  # 33 pairs: 5 programs
    weights = _moe_weights(6, 128, 48, 1, False)
    x = _activations(11, 128, torch.float16, seed=11)
    topk_weights, topk_ids = _routing(11, 3, 8, seed=11)
    out = moe.fused_moe(x.to(DEVICE), moe.prepare_moe(weights.to(DEVICE)),
                        topk_weights.to(DEVICE), topk_ids.to(DEVICE), variant="sorted")
    ref = reference_moe.fused_moe(x.float(), weights, topk_weights, topk_ids)
    _close(out.cpu(), ref, torch.float16)


def test_moe_variant_rule_and_names(monkeypatch):
    monkeypatch.setattr(configs, "UNSORTED_MAX_PAIRS_PER_EXPERT", 0.25)  # vLLM's rule
    assert configs.moe_variant(8, 256, 8) == "unsorted"
    assert configs.moe_variant(9, 256, 8) == "sorted"
    assert configs.moe_variant(4096, 256, 8) == "sorted"
    assert set(configs.MOE_VARIANTS) == {v for v, _ in CONSTRAINTS.moe_variants}


def test_fused_moe_down_split_k(monkeypatch):
    """The down GEMM's K slices (I = 384: three chunks of 128) add up in the top-k sum."""
    weights = _moe_weights(4, 128, 384, 0, False)
    x = _activations(6, 128, torch.float16, seed=6)
    topk_weights, topk_ids = _routing(6, 2, 4, seed=6)
    split = configs.MoEConfig(16, configs.Tile(64, 4, 4), configs.Tile(64, 4, 4, split_k=2))
    monkeypatch.setitem(configs.MOE, (4, 128, 384, 2), {b: split for b in configs.M_BUCKETS})
    out = moe.fused_moe(x.to(DEVICE), moe.prepare_moe(weights.to(DEVICE)),
                        topk_weights.to(DEVICE), topk_ids.to(DEVICE))
    ref = reference_moe.fused_moe(x.float(), weights, topk_weights, topk_ids)
    _close(out.cpu(), ref, torch.float16)


@pytest.mark.parametrize("variant", ["sorted", "unsorted"])
def test_fused_moe_w4a4_emulation(variant):
    m = 7 if variant == "sorted" else 3  # the interpreter runs the unsorted path slowly
    weights = _moe_weights(4, 144, 48, 0, True)
    x = _activations(m, 144, torch.float16, seed=7)
    topk_weights, topk_ids = _routing(m, 2, 4, seed=7)
    out = moe.fused_moe(x.to(DEVICE), moe.prepare_moe(weights.to(DEVICE)),
                        topk_weights.to(DEVICE), topk_ids.to(DEVICE), quantize_activations=True,
                        variant=variant)
    ref = reference_moe.fused_moe(x.float(), weights, topk_weights, topk_ids,
                                  quantize_activations=True)
    _close(out.cpu(), ref, torch.float16)


@pytest.mark.parametrize("variant", ["sorted", "unsorted"])
def test_fused_moe_with_no_local_tokens_is_zero(variant):
    weights = _moe_weights(2, 128, 32, 4, False)
    x = _activations(3, 128, torch.float16, seed=1).to(DEVICE)
    ids = torch.tensor([[0, 1], [2, 3], [6, 7]], device=DEVICE)
    prepared = moe.prepare_moe(weights.to(DEVICE))
    out = moe.fused_moe(x, prepared, torch.ones(3, 2, device=DEVICE), ids, variant=variant)
    assert torch.equal(out, torch.zeros_like(out))


def test_fused_moe_rejects_bad_inputs():
    prepared = moe.prepare_moe(_moe_weights(2, 32, 16, 0, False).to(DEVICE))
    x = torch.zeros(2, 32, dtype=torch.float16, device=DEVICE)
    ids = torch.zeros(2, 1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(NumericsError, match="activation"):
        moe.fused_moe(x, prepared, ids.float(), ids, activation="relu")
    with pytest.raises(NumericsError, match="input scales"):
        moe.fused_moe(x, prepared, ids.float(), ids, quantize_activations=True)
    with pytest.raises(NumericsError, match=r"\[M, k\]"):
        moe.fused_moe(x, prepared, ids.float()[:1], ids[:1])
    with pytest.raises(NumericsError, match="variant"):
        moe.fused_moe(x, prepared, ids.float(), ids, variant="fast")


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("variant, programs", [("sorted", None), ("sorted", 3),
                                               ("unsorted", None)])
def test_fused_moe_is_cuda_graph_capturable(variant, programs, monkeypatch):
    monkeypatch.setattr(align, "_PAIRS_PER_PROGRAM", 8 if programs else 1024)
    weights = _moe_weights(8, 256, 384, 0, False).to(DEVICE)
    prepared = moe.prepare_moe(weights)
    x = _activations(16, 256, torch.bfloat16, seed=2).to(DEVICE)
    topk_weights, topk_ids = (t.to(DEVICE) for t in _routing(16, 2, 8, seed=2))

    def call(ids):
        return moe.fused_moe(x, prepared, topk_weights, ids, variant=variant)

    eager = call(topk_ids)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(topk_ids)  # warm up (compile) off the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(topk_ids)
    new_ids = torch.roll(topk_ids, 1, dims=0)
    topk_ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, call(new_ids))
    assert not torch.equal(captured, eager)
