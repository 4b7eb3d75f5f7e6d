"""W4A16 NVFP4 dense GEMM in Triton: ``y[M, N] = x[M, K] @ W[N, K]^T``, W dequantized in registers.

At large M (from a per-shape threshold in ``configs.DEQUANTIZE``), ``linear`` instead
dequantizes W in bounded row chunks (:func:`_dequantize_kernel`, the same decode) and multiplies
with cuBLAS: Triton 3.6 makes a ``wgmma`` whose operand was decoded in registers synchronous,
which caps the fused kernel near half the bf16 tensor-core rate there (docs/performance.md).

Kernel design (the MoE kernels in ``moe.py`` share the K loop, :func:`mma_chunks`):

- Tiles are computed transposed, ``acc[BLOCK_N, BLOCK_M] += W_tile @ x_tile^T``: the weights are
  the left operand (kept in registers after decoding; Hopper's wgmma reads its A operand from
  registers), the tokens the right one, so a decode step (M = 1..16) pads the token side to 16,
  not to 64.
- Weights are read in the layout of ``layout.py``: one ``[BLOCK_N, 16]`` int32 word tile per 128
  elements of K is split by shifts and masks into eight 16-wide sub-tiles (one per scale block),
  each multiplied by its block scale and fed to one ``tl.dot`` with K = 16.
- Decoding is exact: the E2M1 bits are placed straight into a 16-bit float (value
  ``e2m1 * 2^-14`` in fp16, ``e2m1 * 2^-126`` in bf16) and multiplied (one packed 16-bit
  multiply per two weights) by the block scale times a power of two, itself built from the
  re-encoded scale byte with one shift-and-add (``layout.encode_scale``), so that
  ``e2m1 * s * 2^-7`` (fp16) or ``e2m1 * s * 2^-8`` (bf16) lands exactly in the 16-bit type; the
  global scale and the power of two are applied once to the fp32 accumulator.
- Small M splits K over ``split_k`` programs; each stores an fp32 partial and the last to finish
  a tile (an atomic counter per tile) adds the partials in a fixed order and writes the output:
  one launch, deterministic.
- ``quantize_activations=True`` (W4A4 emulation) quantizes each 16-element block of x in the
  prologue exactly as ``nvfp4.fake_quantize_activation`` does (docs/numerics.md), feeds the
  dot ``e2m1(code) * float(s)`` (exact in 16 bits) and applies ``1 / gs`` with the global scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantoracle.backends.triton_nvfp4 import configs
from quantoracle.backends.triton_nvfp4.layout import (
    CHUNK_K,
    ROW_BLOCK,
    padded_k,
    relayout,
)
from quantoracle.errors import NumericsError
from quantoracle.schemes.tensors import NVFP4Tensor

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
LINEAR_VARIANTS = ("fused", "dequantize")


@dataclass(frozen=True)
class Decode:
    """How codes become 16-bit floats for one activation dtype (see the module docstring).

    ``mag_shift``: right shift from a nibble's magnitude bits at 12..14 of a 16-bit half to the
    exponent/mantissa boundary; ``(scale byte << scale_shift) + scale_base`` are the bits of
    ``s * 2^7`` (fp16) or ``s * 2^118`` (bf16); ``unfold``: the power of two the accumulator is
    multiplied back by.
    """

    dtype: object
    mag_shift: int
    scale_shift: int
    scale_base: int
    unfold: float


DECODE = {
    torch.float16: Decode(tl.float16, 3, 7, 13 << 10, 2.0**7),  # e2m1 * 2^-14 * s * 2^7 <= 21
    torch.bfloat16: Decode(tl.bfloat16, 6, 4, 236 << 7, 2.0**8),  # e2m1 * 2^-126 * s * 2^118
}


# ----------------------------------------------------------------------------- Triton helpers


@triton.jit
def _scale_values(raw, DTYPE: tl.constexpr, SCALE_SHIFT: tl.constexpr,
                  SCALE_BASE: tl.constexpr):
    """Kernel scale bytes (``layout.encode_scale``) -> ``s * 2^7`` (fp16) or ``s * 2^118``
    (bf16), exactly: exponent and mantissa shifted into place, exponent bias added."""
    bits = (raw.to(tl.uint16) << SCALE_SHIFT) + SCALE_BASE
    return bits.to(DTYPE, bitcast=True)


@triton.jit
def _decode_pair(t, DTYPE: tl.constexpr, MAG_SHIFT: tl.constexpr):
    """uint32 words whose nibbles at bits 12..15 and 28..31 are codes -> two DTYPE tiles of
    ``e2m1 * 2^-14`` (fp16) or ``e2m1 * 2^-126`` (bf16): sign bit in place, magnitude shifted
    into the exponent's low bits and the mantissa's top bit (E2M1 subnormal 0.5 included)."""
    bits = (t & 0x80008000) | ((t & 0x70007000) >> MAG_SHIFT)
    lo = (bits & 0xFFFF).to(tl.uint16).to(DTYPE, bitcast=True)
    hi = (bits >> 16).to(tl.uint16).to(DTYPE, bitcast=True)
    return lo, hi


@triton.jit
def _scaled_subtile(w, scale_word, J: tl.constexpr, DTYPE: tl.constexpr,
                    SCALE_SHIFT: tl.constexpr, SCALE_BASE: tl.constexpr):
    """Decoded sub-tile J of a chunk ``[rows, 16]`` times its rows' block scales (byte J of each
    row's int64 ``scale_word``) with the fold: ``e2m1 * s * 2^-7`` (fp16) or ``* 2^-8`` (bf16),
    exact."""
    raw = ((scale_word >> (8 * J)) & 0xFF).to(tl.uint8)
    return w * _scale_values(raw, DTYPE, SCALE_SHIFT, SCALE_BASE)[:, None]


@triton.jit
def _round_e4m3(v):
    """Round float32 ``0 <= v <= 448`` to the nearest float8_e4m3fn value (ties to even), as
    ``.to(torch.float8_e4m3fn)`` does; returned as float32."""
    bits = v.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    subnormal = (v + 24576.0) - 24576.0  # 1.5 * 2^14 has ulp 2^-9, the e4m3 subnormal step
    return tl.where(v < 0.015625, subnormal, normal)


@triton.jit
def _round_e2m1(v):
    """Round float32 ``|v| <= 6`` to the E2M1 grid, ties to the even index (as encode_e2m1)."""
    a = tl.abs(v)
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    per_step = tl.where(a < 2.0, 2.0, tl.where(a < 4.0, 1.0, 0.5))
    n = (a * per_step + 12582912.0) - 12582912.0  # a / step, exact; + 1.5 * 2^23: to even
    return tl.where(v < 0, -n * step, n * step)


@triton.jit
def _fake_quant_block(x, gs, inv_gs, DTYPE: tl.constexpr):
    """x ``[16, BM]`` (a 16-element K block per column) -> ``e2m1(code) * float(s)`` in DTYPE,
    exact; codes and scales follow nvfp4.quantize_activation with ``gs = 1 / input_scale``.
    The dequantized value is this times ``1 / gs``, which the caller applies after the dot."""
    xf = x.to(tl.float32)
    amax = tl.max(tl.abs(xf), axis=0)
    s = _round_e4m3(tl.minimum(gs * (amax * (1.0 / 6.0)), 448.0))
    denominator = tl.where(s == 0.0, 1.0, s * inv_gs)
    r = tl.where(s == 0.0, 0.0, tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), denominator))
    q = _round_e2m1(tl.clamp(xf * r[None, :], -6.0, 6.0))
    return (q * s[None, :]).to(DTYPE)


@triton.jit
def _sub_dot(acc, w, scale_word, J: tl.constexpr, x, gs, inv_gs, gs_odd, inv_gs_odd,
             QUANT_X: tl.constexpr, ODD_ROWS_OWN_SCALE: tl.constexpr, DTYPE: tl.constexpr,
             SCALE_SHIFT: tl.constexpr, SCALE_BASE: tl.constexpr):
    """``acc += (w * scale) @ x`` for sub-tile J of a chunk (its scale: byte J of the row's
    int64 ``scale_word``). Under QUANT_X, x is fake-quantized with ``gs``, or, with
    ``ODD_ROWS_OWN_SCALE``, with ``gs`` for even rows and ``gs_odd`` for odd rows (two dots)."""
    w = _scaled_subtile(w, scale_word, J, DTYPE, SCALE_SHIFT, SCALE_BASE)
    if QUANT_X:
        if ODD_ROWS_OWN_SCALE:
            odd = (tl.arange(0, w.shape[0]) % 2 == 1)[:, None]
            x_even = _fake_quant_block(x, gs, inv_gs, DTYPE)
            acc = tl.dot(tl.where(odd, 0.0, w).to(DTYPE), x_even, acc)
            x_odd = _fake_quant_block(x, gs_odd, inv_gs_odd, DTYPE)
            return tl.dot(tl.where(odd, w, 0.0).to(DTYPE), x_odd, acc)
        return tl.dot(w, _fake_quant_block(x, gs, inv_gs, DTYPE), acc)
    return tl.dot(w, x.to(DTYPE), acc)


@triton.jit
def word_tile_ptrs(w_ptr, rows, stride_wb):
    """``[BN, 16]`` pointers to chunk 0's words of weight rows ``rows`` (``layout.py``: tiles of
    16 rows x 16 words, ``stride_wb`` words per row block; chunk c is ``256 c`` words on)."""
    return w_ptr + (rows // 16)[:, None] * stride_wb + (rows % 16)[:, None] * 16 \
        + tl.arange(0, 16)[None, :]


@triton.jit
def mma_chunks(acc, w_ptrs, s_ptrs, x_ptrs, x_mask, k_index, chunk_start, chunk_end, K,
               stride_sc, gs, inv_gs, gs_odd, inv_gs_odd,
               K_EXACT: tl.constexpr, QUANT_X: tl.constexpr, ODD_ROWS_OWN_SCALE: tl.constexpr,
               DTYPE: tl.constexpr, MAG_SHIFT: tl.constexpr, SCALE_SHIFT: tl.constexpr,
               SCALE_BASE: tl.constexpr):
    """The K loop every kernel shares: ``acc[BN, BM] += W[rows, k] x^T[k, tokens]`` over the
    128-element chunks ``[chunk_start, chunk_end)``, unscaled by the global scales.

    ``w_ptrs`` ``[BN, 16]``: chunk 0's words (:func:`word_tile_ptrs`); ``s_ptrs`` ``[BN]``:
    chunk 0's int64 scale words (chunks are ``stride_sc`` apart); ``x_ptrs`` ``[16, BM]``: x^T's
    first sub-tile, with ``x_mask`` its token mask and ``k_index`` ``[16, 1]`` = 0..15.
    QUANT_X: see ``_sub_dot``.
    """
    for c in range(chunk_start, chunk_end):
        words = tl.load(w_ptrs + c * 256).to(tl.uint32, bitcast=True)
        scale_word = tl.load(s_ptrs + c * stride_sc)
        acc = chunk_dot(acc, words, scale_word, x_ptrs, x_mask, k_index, c, K,
                        gs, inv_gs, gs_odd, inv_gs_odd, K_EXACT, QUANT_X, ODD_ROWS_OWN_SCALE,
                        DTYPE, MAG_SHIFT, SCALE_SHIFT, SCALE_BASE)
    return acc


@triton.jit
def chunk_dot(acc, words, scale_word, x_ptrs, x_mask, k_index, c, K,
              gs, inv_gs, gs_odd, inv_gs_odd,
              K_EXACT: tl.constexpr, QUANT_X: tl.constexpr, ODD_ROWS_OWN_SCALE: tl.constexpr,
              DTYPE: tl.constexpr, MAG_SHIFT: tl.constexpr, SCALE_SHIFT: tl.constexpr,
              SCALE_BASE: tl.constexpr):
    """One 128-element chunk c of :func:`mma_chunks`: ``acc += W_c x_c^T`` from the chunk's
    loaded uint32 ``words`` ``[BN, 16]`` and int64 ``scale_word`` ``[BN]``; x^T's sub-tiles are
    loaded from ``x_ptrs + 128 c + 16 j`` under ``x_mask`` (and ``k < K`` unless K_EXACT)."""
    for a in tl.static_range(4):
        # After a left shift by 4a, bits 12..15 / 28..31 hold nibbles 3 - a and 7 - a.
        j_lo = 3 - a
        j_hi = 7 - a
        k_lo = c * 128 + j_lo * 16
        k_hi = c * 128 + j_hi * 16
        if K_EXACT:
            x_lo = tl.load(x_ptrs + k_lo, mask=x_mask, other=0.0)
            x_hi = tl.load(x_ptrs + k_hi, mask=x_mask, other=0.0)
        else:
            x_lo = tl.load(x_ptrs + k_lo, mask=x_mask & (k_index + k_lo < K), other=0.0)
            x_hi = tl.load(x_ptrs + k_hi, mask=x_mask & (k_index + k_hi < K), other=0.0)
        w_lo, w_hi = _decode_pair(words << (4 * a), DTYPE, MAG_SHIFT)
        acc = _sub_dot(acc, w_lo, scale_word, j_lo, x_lo, gs, inv_gs, gs_odd, inv_gs_odd,
                       QUANT_X, ODD_ROWS_OWN_SCALE, DTYPE, SCALE_SHIFT, SCALE_BASE)
        acc = _sub_dot(acc, w_hi, scale_word, j_hi, x_hi, gs, inv_gs, gs_odd, inv_gs_odd,
                       QUANT_X, ODD_ROWS_OWN_SCALE, DTYPE, SCALE_SHIFT, SCALE_BASE)
    return acc


@triton.jit
def activation_scales(iscale_ptr, QUANT_X: tl.constexpr):
    """``(gs, 1 / gs)`` of a static input scale as nvfp4 computes them (two fp32 divisions), or
    ``(1, 1)`` when activations are not quantized."""
    if QUANT_X:
        gs = tl.math.div_rn(1.0, tl.load(iscale_ptr))
        inv_gs = tl.math.div_rn(1.0, gs)
    else:
        gs = 1.0
        inv_gs = 1.0
    return gs, inv_gs


# Not specialized on the batch-dependent ints: one compiled kernel serves every M.
@triton.jit(do_not_specialize=["M", "CHUNKS_PER_SPLIT", "SPLIT_K"])
def _dense_kernel(
    x_ptr, w_ptr, s_ptr, row_scale_ptr, iscale_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, ROW0, K, stride_xm, stride_om, stride_wb, stride_sc, CHUNKS, CHUNKS_PER_SPLIT, SPLIT_K,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    K_EXACT: tl.constexpr, QUANT_X: tl.constexpr,
    DTYPE: tl.constexpr, MAG_SHIFT: tl.constexpr, SCALE_SHIFT: tl.constexpr,
    SCALE_BASE: tl.constexpr, UNFOLD: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_w = ROW0 + offs_n % N  # ragged N: read valid rows, store only the real ones
    k_index = tl.arange(0, 16)[:, None]
    w_ptrs = word_tile_ptrs(w_ptr, rows_w, stride_wb)
    s_ptrs = s_ptr + rows_w
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + k_index
    x_mask = (offs_m < M)[None, :]
    gs, inv_gs = activation_scales(iscale_ptr, QUANT_X)

    chunk_start = pid_k * CHUNKS_PER_SPLIT
    chunk_end = tl.minimum(chunk_start + CHUNKS_PER_SPLIT, CHUNKS)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc = mma_chunks(acc, w_ptrs, s_ptrs, x_ptrs, x_mask, k_index, chunk_start, chunk_end, K,
                     stride_sc, gs, inv_gs, gs, inv_gs, K_EXACT, QUANT_X, False,
                     DTYPE, MAG_SHIFT, SCALE_SHIFT, SCALE_BASE)

    scale = tl.load(row_scale_ptr + rows_w) * (UNFOLD * inv_gs)
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    out_mask = (offs_n < N)[:, None] & x_mask
    if SPLIT_K == 1:
        tl.store(out_ptrs, (acc * scale[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials [SPLIT_K, N, BLOCK_M] (one M tile); the last program of this N tile adds them.
        tile = offs_n[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        tl.store(partial_ptr + pid_k * N * BLOCK_M + tile, acc, mask=(offs_n < N)[:, None])
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(partial_ptr + s * N * BLOCK_M + tile,
                                 mask=(offs_n < N)[:, None], other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, (total * scale[:, None]).to(out_ptr.dtype.element_ty),
                     mask=out_mask)
            tl.atomic_xchg(counter_ptr + pid_n, 0)  # ready for the next call (graph replays)


@triton.jit
def _store_subtile(out_ptrs, w, scale_word, J: tl.constexpr, row_mask, k_sub, K,
                   K_EXACT: tl.constexpr, DTYPE: tl.constexpr, SCALE_SHIFT: tl.constexpr,
                   SCALE_BASE: tl.constexpr):
    """Store sub-tile J of a chunk, scaled (:func:`_scaled_subtile`), at ``out_ptrs + 16 J``;
    ``k_sub`` ``[1, 16]``: sub-tile 0's K indices, masked against K unless K_EXACT."""
    mask = row_mask if K_EXACT else row_mask & (k_sub + 16 * J < K)
    tl.store(out_ptrs + 16 * J, _scaled_subtile(w, scale_word, J, DTYPE, SCALE_SHIFT, SCALE_BASE),
             mask=mask)


@triton.jit(do_not_specialize=["ROW0", "ROWS"])  # one kernel for every chunk
def _dequantize_kernel(
    w_ptr, s_ptr, out_ptr, ROW0, ROWS, K, stride_wb, stride_sc, stride_on,
    BLOCK_N: tl.constexpr, K_EXACT: tl.constexpr,
    DTYPE: tl.constexpr, MAG_SHIFT: tl.constexpr, SCALE_SHIFT: tl.constexpr,
    SCALE_BASE: tl.constexpr,
):
    """``out[r, k]`` (DTYPE, row stride ``stride_on``) = weight row ``ROW0 + r``, element k,
    times its block scale with the fold (``e2m1 * s * 2^-7`` in fp16, ``* 2^-8`` in bf16: the
    operand ``mma_chunks`` feeds its dots, exact), for ``r < ROWS`` and k in the 128-element
    chunk ``program_id(1)`` (``k < K``). The global scale and the fold are left to the caller."""
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_w = ROW0 + offs_n % ROWS  # ragged rows: read valid rows, store only the real ones
    words = tl.load(word_tile_ptrs(w_ptr, rows_w, stride_wb) + c * 256).to(tl.uint32,
                                                                          bitcast=True)
    scale_word = tl.load(s_ptr + c * stride_sc + rows_w)
    k_sub = c * 128 + tl.arange(0, 16)[None, :]
    out_ptrs = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + k_sub
    row_mask = (offs_n < ROWS)[:, None]
    for a in tl.static_range(4):
        # As in mma_chunks: after a left shift by 4a, nibbles 3 - a and 7 - a are on top.
        w_lo, w_hi = _decode_pair(words << (4 * a), DTYPE, MAG_SHIFT)
        _store_subtile(out_ptrs, w_lo, scale_word, 3 - a, row_mask, k_sub, K, K_EXACT,
                       DTYPE, SCALE_SHIFT, SCALE_BASE)
        _store_subtile(out_ptrs, w_hi, scale_word, 7 - a, row_mask, k_sub, K, K_EXACT,
                       DTYPE, SCALE_SHIFT, SCALE_BASE)


# ----------------------------------------------------------------------------- host side


@dataclass(frozen=True, eq=False)
class PreparedLinear:
    """An NVFP4 Linear in the kernel layout (``layout.py``), on the weight's device.

    - ``words`` int32 ``[ceil(N/16), Kp/128, 16, 16]``, ``scales`` int64 ``[Kp/128, N]``
      (4.5 bits per weight);
    - ``row_scale`` float32 ``[N]``: each row's global scale (``weight_scale_2`` of its shard);
    - ``shard_scales``: the same per shard, on the host (read once here, so that the large-M
      path can hand them to cuBLAS as its alpha without synchronizing);
    - ``input_scale`` float32 ``[S]`` or None: per shard, for W4A4 emulation;
    - ``counters`` int32 ``[ceil(N/16)]`` zeros: split-K arrival counters. Each call leaves them
      zero again, so one PreparedLinear must not run on two streams at once.
    """

    words: torch.Tensor
    scales: torch.Tensor
    row_scale: torch.Tensor
    shard_scales: tuple[float, ...]
    input_scale: torch.Tensor | None
    n: int
    k: int
    shards: int
    counters: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.scales, self.row_scale))


def prepare_linear(weight: NVFP4Tensor) -> PreparedLinear:
    """Re-lay a Linear's NVFP4 weight (no lead dims) for :func:`linear` (see ``layout.py``)."""
    if weight.packed.dim() != 2:
        raise NumericsError(
            f"prepare_linear takes one [N, K/2] weight, found packed "
            f"{tuple(weight.packed.shape)}; use prepare_moe for stacked experts"
        )
    n = weight.rows
    words, scales = relayout(weight.packed, weight.block_scale)
    return PreparedLinear(
        words=words,
        scales=scales,
        row_scale=weight.row_global_scale().reshape(n).contiguous(),
        shard_scales=tuple(weight.global_scale.float().tolist()),
        input_scale=None if weight.input_scale is None else weight.input_scale.contiguous(),
        n=n,
        k=weight.cols,
        shards=weight.shards,
        counters=torch.zeros(triton.cdiv(n, 16), dtype=torch.int32, device=weight.packed.device),
    )


def check_activations(x: torch.Tensor, k: int, what: str) -> None:
    """Raise NumericsError unless x is a bf16 or fp16 tensor whose last dim is k."""
    if x.dtype not in ACTIVATION_DTYPES:
        raise NumericsError(
            f"{what}: activations must be bfloat16 or float16, found {x.dtype}; cast x first"
        )
    if x.shape[-1] != k:
        raise NumericsError(f"{what}: x has K = {x.shape[-1]}, the weight expects K = {k}")


def linear(
    x: torch.Tensor, prepared: PreparedLinear, *, quantize_activations: bool = False,
    variant: str | None = None, dequantize_from_m: int | None = None, scratch_bytes: int = configs.SCRATCH_BYTES,
) -> torch.Tensor:
    """``x[..., K] @ W^T`` -> ``[..., N]`` in x.dtype (bf16 or fp16), fp32 accumulation.

    Two paths (the plugin's declared variants, :data:`LINEAR_VARIANTS`), same numerics (each
    product ``e2m1 * s`` exact in 16 bits, fp32 accumulation, the shard's fp32 global scale
    applied to the fp32 result before the one rounding):

    - ``"fused"``: the fused kernel, weights dequantized in registers;
    - ``"dequantize"`` (weight-only), :func:`_launch_dequantized`: the weight is dequantized in
      row chunks into a transient scratch buffer of at most ``max(scratch_bytes, 16 rows)``
      (64 MiB by default), each chunk multiplied by cuBLAS into its output columns, the
      dequantize-then-GEMM technique vLLM uses for AWQ at large batch. The weights stay at 4.5
      bits/weight at rest (the design's "no bf16 copy of the weights" is about weights at rest);
      the scratch lives for one call and is bounded whatever N.

    ``variant=None`` (a direct call, not through the engine) takes ``"dequantize"`` from
    ``dequantize_from_m`` tokens on (default: ``configs.dequantize_config(N, K).min_m``, measured
    per shape on an H100), else ``"fused"``. The engine passes the plan's variant instead.

    ``quantize_activations``: W4A4 emulation (fused kernel only), x quantized per shard with the
    shard's static input scale (one launch per shard). Never synchronizes with the host (CUDA
    graph capturable). Raises NumericsError for a wrong dtype or K, W4A4 without input scales,
    an unknown variant, or W4A4 asked of the dequantize variant.
    """
    check_activations(x, prepared.k, "triton_nvfp4 linear")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, prepared.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], prepared.n
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    if variant is None:
        if dequantize_from_m is None:
            dequantize_from_m = configs.dequantize_config(n, prepared.k).min_m
        variant = "dequantize" if m >= dequantize_from_m and not quantize_activations else "fused"
    if variant not in LINEAR_VARIANTS:
        raise NumericsError(f"triton_nvfp4 linear: unknown variant {variant!r}; use one of {', '.join(LINEAR_VARIANTS)}")
    if quantize_activations:
        if variant != "fused":
            raise NumericsError("triton_nvfp4 linear: W4A4 emulation runs in the fused variant only")
        if prepared.input_scale is None:
            raise NumericsError(
                "W4A4 emulation needs the checkpoint's input_scale; this weight has none "
                "(serve it weight-only: quantize_activations=False)"
            )
        rows = n // prepared.shards
        for shard in range(prepared.shards):
            _launch_dense(x2, prepared, out, shard * rows, rows, prepared.input_scale[shard:])
    elif variant == "dequantize":
        _launch_dequantized(x2, prepared, out, scratch_bytes)
    else:
        _launch_dense(x2, prepared, out, 0, n, None)
    return out.reshape(*lead, n)


def _launch_dense(x, prepared, out, row0, rows, input_scale):
    """One launch over weight rows ``[row0, row0 + rows)`` into ``out[:, row0:row0 + rows]``."""
    m, k = x.shape
    decode = DECODE[x.dtype]
    chunks = padded_k(k) // CHUNK_K
    cfg = configs.dense_config(m, rows, k, chunks)
    split_k = cfg.split_k if m <= cfg.block_m else 1
    per_split = triton.cdiv(chunks, split_k)
    split_k = triton.cdiv(chunks, per_split)
    grid = (triton.cdiv(rows, cfg.block_n), triton.cdiv(m, cfg.block_m), split_k)
    partial = (
        torch.empty(split_k, rows, cfg.block_m, dtype=torch.float32, device=x.device)
        if split_k > 1 else out
    )
    _dense_kernel[grid](
        x, prepared.words, prepared.scales, prepared.row_scale,
        input_scale if input_scale is not None else prepared.row_scale,
        out[:, row0:], partial, prepared.counters,
        m, rows, row0, k, x.stride(0), out.stride(0), prepared.words.stride(0),
        prepared.scales.stride(0), chunks, per_split, split_k,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m,
        K_EXACT=k % CHUNK_K == 0, QUANT_X=input_scale is not None,
        DTYPE=decode.dtype, MAG_SHIFT=decode.mag_shift, SCALE_SHIFT=decode.scale_shift,
        SCALE_BASE=decode.scale_base, UNFOLD=decode.unfold,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _launch_dequantized(x, prepared, out, scratch_bytes):
    """``out = x @ W^T`` by row chunks: per chunk of each shard, :func:`_dequantize_kernel` into
    one reused scratch ``[chunk_rows, K]`` in x.dtype, then cuBLAS ``out[:, chunk] = alpha *
    x @ scratch^T`` with alpha the shard's global scale times the fold's inverse (fp32, applied
    by cuBLAS to its fp32 result). ``chunk_rows``: as many as ``scratch_bytes`` holds, a
    multiple of 16, at least 16, at most a shard."""
    m, k = x.shape
    decode = DECODE[x.dtype]
    cfg = configs.dequantize_config(prepared.n, k)
    chunks = padded_k(k) // CHUNK_K
    shard_rows = prepared.n // prepared.shards
    per_chunk = scratch_bytes // (k * x.element_size()) // ROW_BLOCK * ROW_BLOCK
    chunk_rows = min(shard_rows, max(ROW_BLOCK, per_chunk))
    scratch = torch.empty(chunk_rows, k, dtype=x.dtype, device=x.device)
    for shard, global_scale in enumerate(prepared.shard_scales):
        alpha = global_scale * decode.unfold
        for row0 in range(shard * shard_rows, (shard + 1) * shard_rows, chunk_rows):
            rows = min(chunk_rows, (shard + 1) * shard_rows - row0)
            _dequantize_kernel[(triton.cdiv(rows, cfg.block_n), chunks)](
                prepared.words, prepared.scales, scratch, row0, rows, k,
                prepared.words.stride(0), prepared.scales.stride(0), scratch.stride(0),
                BLOCK_N=cfg.block_n, K_EXACT=k % CHUNK_K == 0,
                DTYPE=decode.dtype, MAG_SHIFT=decode.mag_shift, SCALE_SHIFT=decode.scale_shift,
                SCALE_BASE=decode.scale_base, num_warps=cfg.num_warps,
            )
            out[:, row0:row0 + rows].addmm_(x, scratch[:rows].T, beta=0, alpha=alpha)
