"""W4A16 NVFP4 dense GEMM in Triton: ``y[M, N] = x[M, K] @ W[N, K]^T``, W dequantized in registers.

At large M (from a per-shape threshold in ``configs.DEQUANTIZE``), ``linear`` instead
dequantizes W in bounded row chunks (:func:`_dequantize_kernel`, the same decode; the next chunk
on a side stream while the current one is multiplied) and multiplies with cuBLAS: Triton 3.6 makes a ``wgmma`` whose operand was decoded in registers synchronous,
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
  prologue exactly as ``nvfp4.fake_quantize_activation`` does (FORMATS.md section 4), feeds the
  dot ``e2m1(code) * float(s)`` (exact in 16 bits) and applies ``1 / gs`` with the global scale.
"""

from __future__ import annotations

import contextlib
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
    dequantize_from_m: int | None = None, scratch_bytes: int = configs.SCRATCH_BYTES,
) -> torch.Tensor:
    """``x[..., K] @ W^T`` -> ``[..., N]`` in x.dtype (bf16 or fp16), fp32 accumulation.

    Two paths, same numerics (each product ``e2m1 * s`` exact in 16 bits, fp32 accumulation,
    the shard's fp32 global scale applied to the fp32 result before the one rounding):

    - below ``dequantize_from_m`` tokens (default: ``configs.dequantize_config(N, K).min_m``,
      measured per shape), the fused kernel, weights dequantized in registers;
    - from there on (weight-only), :func:`_launch_dequantized`: the weight is dequantized in
      row chunks into a transient scratch of at most ``max(scratch_bytes, 16 rows)`` (64 MiB by
      default; two buffers when the weight takes more than one chunk, the next chunk
      dequantized on a side stream while cuBLAS multiplies the current one), each chunk
      multiplied by cuBLAS into its output columns, the dequantize-then-GEMM technique vLLM uses
      for AWQ at large batch. The weights stay at 4.5
      bits/weight at rest (DESIGN.md's "no bf16 copy of the weights" is about weights at rest);
      the scratch lives for one call and is bounded whatever N.

    ``quantize_activations``: W4A4 emulation (fused kernel only), x quantized per shard with the
    shard's static input scale (one launch per shard). Never synchronizes with the host (CUDA
    graph capturable). Raises NumericsError for a wrong dtype or K, or W4A4 without input scales.
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
    if dequantize_from_m is None:
        dequantize_from_m = configs.dequantize_config(n, prepared.k).min_m
    if quantize_activations:
        if prepared.input_scale is None:
            raise NumericsError(
                "W4A4 emulation needs the checkpoint's input_scale; this weight has none "
                "(serve it weight-only: quantize_activations=False)"
            )
        rows = n // prepared.shards
        for shard in range(prepared.shards):
            _launch_dense(x2, prepared, out, shard * rows, rows, prepared.input_scale[shard:])
    elif m >= dequantize_from_m:
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


def row_chunks(n: int, shards: int, k: int, element_size: int, scratch_bytes: int,
               overlap: bool = True) -> tuple[int, list[tuple[int, int, int]]]:
    """The large-M path's plan: ``(buffers, [(shard, row0, rows), ...])``.

    ``fit``: the rows ``scratch_bytes`` holds (a multiple of 16, at least 16). One buffer of
    ``min(shard rows, fit)`` rows when the whole weight is one chunk, when ``overlap`` is off or
    when ``fit`` < 32 rows; otherwise two buffers of ``min(shard rows, fit / 2)`` rows each (so the
    scratch stays within ``max(scratch_bytes, 16 rows)``), chunk i + 1 dequantized while chunk i
    is multiplied. Chunks never cross a shard (each shard has its own global scale)."""
    shard_rows = n // shards
    fit = max(ROW_BLOCK, scratch_bytes // (k * element_size) // ROW_BLOCK * ROW_BLOCK)
    buffers = 2 if overlap and fit >= 2 * ROW_BLOCK and (shards > 1 or shard_rows > fit) else 1
    chunk_rows = min(shard_rows, fit // buffers // ROW_BLOCK * ROW_BLOCK)
    chunks = [(shard, row0, min(chunk_rows, (shard + 1) * shard_rows - row0))
              for shard in range(shards)
              for row0 in range(shard * shard_rows, (shard + 1) * shard_rows, chunk_rows)]
    return min(buffers, len(chunks)), chunks


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream the large-M path dequantizes on, one per device (created once)."""
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


def _launch_dequantized(x, prepared, out, scratch_bytes, *, overlap=True):
    """``out = x @ W^T`` by row chunks (:func:`row_chunks`): per chunk, :func:`_dequantize_kernel`
    into a scratch ``[chunk_rows, K]`` in x.dtype, then cuBLAS ``out[:, chunk] = alpha *
    x @ scratch^T`` with alpha the shard's global scale times the fold's inverse (fp32, applied
    by cuBLAS to its fp32 result).

    With two buffers, chunk i + 1 is dequantized into the other buffer while chunk i is
    multiplied: on CUDA on a side stream forked from the current one (``side.wait_stream(main)``
    before each dequantization: the GEMM that last read its buffer, two chunks back, is done;
    ``main.wait_stream(side)`` before each GEMM: its chunk is written). The last dequantization is
    waited for by the last GEMM, so all side work is joined into the current stream before the
    call returns: no host synchronization, CUDA-graph capturable (the side stream forks from
    and joins the capturing stream), and the scratch, allocated on and freed to the current
    stream, is only reused by work ordered after the join. (``record_stream`` is deliberately not
    used: it would keep every call's scratch from being reused until the side stream's event
    completes, and within a graph capture until the capture ends: one scratch per call.) On CPU
    (interpreter) the same order runs on one stream. ``overlap=False``: one buffer, dequantize
    then multiply, one stream (the previous path, kept for comparison)."""
    m, k = x.shape
    decode = DECODE[x.dtype]
    cfg = configs.dequantize_config(prepared.n, k)
    kchunks = padded_k(k) // CHUNK_K
    buffers, chunks = row_chunks(prepared.n, prepared.shards, k, x.element_size(), scratch_bytes,
                                 overlap)
    chunk_rows = max(rows for _, _, rows in chunks)
    scratch = [torch.empty(chunk_rows, k, dtype=x.dtype, device=x.device) for _ in range(buffers)]
    main = side = None
    if buffers == 2 and x.is_cuda:
        main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)

    def dequantize(i):
        _, row0, rows = chunks[i]
        buf = scratch[i % buffers]
        if side is not None:
            side.wait_stream(main)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            _dequantize_kernel[(triton.cdiv(rows, cfg.block_n), kchunks)](
                prepared.words, prepared.scales, buf, row0, rows, k,
                prepared.words.stride(0), prepared.scales.stride(0), buf.stride(0),
                BLOCK_N=cfg.block_n, K_EXACT=k % CHUNK_K == 0,
                DTYPE=decode.dtype, MAG_SHIFT=decode.mag_shift, SCALE_SHIFT=decode.scale_shift,
                SCALE_BASE=decode.scale_base, num_warps=cfg.num_warps,
            )

    ahead = buffers - 1  # chunks dequantized ahead of the GEMM: 0 or 1
    if ahead:
        dequantize(0)
    for i, (shard, row0, rows) in enumerate(chunks):
        if not ahead:
            dequantize(i)
        else:
            if side is not None:
                main.wait_stream(side)  # chunk i is written (side's last work so far)
            if i + 1 < len(chunks):
                dequantize(i + 1)  # after GEMM i - 1 (main's last work), which read its buffer
        alpha = prepared.shard_scales[shard] * decode.unfold
        out[:, row0:row0 + rows].addmm_(x, scratch[i % buffers][:rows].T, beta=0, alpha=alpha)
