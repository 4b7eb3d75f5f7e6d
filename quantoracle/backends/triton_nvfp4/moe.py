"""W4A16 NVFP4 fused MoE in Triton, no host synchronization; two paths (``variant``).

**sorted** (four or five launches):

1. ``align``: sort the routed (token, slot) pairs by local expert into blocks of ``block_m``.
2. gate/up GEMM (:func:`_moe_gemm_kernel`, ``GATED``): per block, the tokens' rows of x are
   gathered straight into the dot's operand. ``prepare_moe`` interleaves the gate and up rows
   (row 2n = gate n, row 2n + 1 = up n), so one accumulator tile holds matching gate and up
   outputs and the epilogue computes ``act(gate) * up`` (each with its own global scale),
   stored per pair ``[P, I]``.
3. down GEMM (same kernel, not gated): reads the pair's intermediate row, multiplies by the pair's
   router weight in the epilogue (fp32), stores ``[P, H]`` in x.dtype (fp32 under W4A4
   emulation). Small batches may split K into slices, each stored ``[P, H]`` in fp32.
4. top-k sum: adds each token's local pairs (and K slices) in fp32 in a fixed order
   (deterministic), casts to x.dtype.

**unsorted** (two launches, no sort; for decode, where pairs rarely share an expert):

1. gate/up (:func:`_pair_up_kernel`): one program per (pair, row tile, K slice) reads its
   expert id from ``topk_ids``; the pair's x row is column 0 of a 16-wide dot; epilogue as
   above, stored ``[P, I]``. K slices meet in the last program to arrive (fp32 partials,
   arrival counters in ``PreparedMoE.counters``).
2. down + top-k sum (:func:`_pair_down_kernel`): one program per (token, row tile, slice of
   the top_k x K-chunk iterations); slot j accumulates in column j of the dot, the epilogue
   scales each column by its router weight and global scale and adds them (fp32, fixed
   order) into ``out``.

The K loop and the in-register dequantization are ``gemm.mma_chunks`` / ``gemm.chunk_dot``
(see ``gemm.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantoracle.backends.triton_nvfp4 import configs
from quantoracle.backends.triton_nvfp4.align import align, block_expert
from quantoracle.backends.triton_nvfp4.gemm import (
    DECODE,
    activation_scales,
    check_activations,
    chunk_dot,
    mma_chunks,
    word_tile_ptrs,
)
from quantoracle.backends.triton_nvfp4.layout import CHUNK_K, padded_k, relayout
from quantoracle.errors import NumericsError
from quantoracle.schemes.tensors import MoEWeights

ACTIVATIONS = ("silu", "gelu")


@triton.jit(do_not_specialize=["P", "CHUNKS_PER_SPLIT"])  # one kernel for every batch size
def _moe_gemm_kernel(
    a_ptr, w_ptr, s_ptr, gscale_ptr, iscale_ptr, out_ptr,
    sorted_ptr, block_ends_ptr, topk_w_ptr,
    N, K, P, TOP_K, E, stride_am, stride_we, stride_wb, stride_se, stride_sc, stride_os, stride_om,
    CHUNKS, CHUNKS_PER_SPLIT,
    LOG2_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    K_EXACT: tl.constexpr, QUANT_X: tl.constexpr,
    DTYPE: tl.constexpr, MAG_SHIFT: tl.constexpr, SCALE_SHIFT: tl.constexpr,
    SCALE_BASE: tl.constexpr, UNFOLD: tl.constexpr,
):
    """One ``[BLOCK_N rows, BLOCK_M pairs]`` tile of an expert block; N = weight rows.

    GATED: rows alternate gate/up (scales ``[E, 2]``), A = x gathered by token ``p // TOP_K``,
    ``out[p, n] = act(gate_n) * up_n`` for n < N / 2. Otherwise (scales ``[E, 1]``): A = the
    intermediate row p, ``out[s, p, n] = y_n * router_weight[p]`` (computed in fp32) for the
    K slice s = program_id(2) of CHUNKS_PER_SPLIT chunks (the top-k sum adds the slices).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    expert = block_expert(block_ends_ptr, pid_m, E, LOG2_E)
    if expert >= E:
        return
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    pair_ok = pairs < P
    if GATED:
        a_rows = pairs // TOP_K
    else:
        a_rows = pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_w = offs_n % N
    k_index = tl.arange(0, 16)[:, None]
    w_ptrs = word_tile_ptrs(w_ptr + expert.to(tl.int64) * stride_we, rows_w, stride_wb)
    s_ptrs = s_ptr + expert.to(tl.int64) * stride_se + rows_w
    x_ptrs = a_ptr + a_rows.to(tl.int64)[None, :] * stride_am + k_index
    x_mask = pair_ok[None, :]
    shards: tl.constexpr = 2 if GATED else 1
    gs, inv_gs = activation_scales(iscale_ptr + expert * shards, QUANT_X)
    gs_up, inv_gs_up = activation_scales(iscale_ptr + expert * shards + shards - 1, QUANT_X)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    chunk_start = pid_k * CHUNKS_PER_SPLIT
    chunk_end = tl.minimum(chunk_start + CHUNKS_PER_SPLIT, CHUNKS)
    acc = mma_chunks(acc, w_ptrs, s_ptrs, x_ptrs, x_mask, k_index, chunk_start, chunk_end, K,
                     stride_sc,
                     gs, inv_gs, gs_up, inv_gs_up, K_EXACT, QUANT_X, GATED,
                     DTYPE, MAG_SHIFT, SCALE_SHIFT, SCALE_BASE)

    shard = rows_w % shards
    scale = tl.load(gscale_ptr + expert * shards + shard) * UNFOLD
    scale *= tl.where(shard == 0, inv_gs, inv_gs_up)
    y = acc * scale[:, None]
    if GATED:
        gate, up = tl.split(tl.permute(tl.reshape(y, (BLOCK_N // 2, 2, BLOCK_M)), (0, 2, 1)))
        if ACTIVATION == "silu":
            y = gate * tl.sigmoid(gate) * up
        else:
            y = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)) * up
        offs_out = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        n_out = N // 2
    else:
        router = tl.load(topk_w_ptr + pairs, mask=pair_ok, other=0.0).to(tl.float32)
        y = y * router[None, :]
        offs_out = offs_n
        n_out = N
    out_ptrs = out_ptr + pid_k * stride_os + pairs.to(tl.int64)[None, :] * stride_om \
        + offs_out[:, None]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty),
             mask=(offs_out < n_out)[:, None] & pair_ok[None, :])


@triton.jit(do_not_specialize=["first_expert"])
def _topk_sum_kernel(y_ptr, topk_w_ptr, topk_ids_ptr, out_ptr, H, first_expert, E, SPLITS, stride_ys,
                     TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, WEIGHTED: tl.constexpr):
    """``out[t, :] = sum over local slots j and K slices s of y[s, t * TOP_K + j, :]`` (each
    term times the slot's router weight ``topk_w[t, j]`` when WEIGHTED) in fp32, in a fixed
    order (deterministic); rows of non-local slots are never read (they may hold anything)."""
    token = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs < H
    total = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        local_id = tl.load(topk_ids_ptr + pair).to(tl.int32) - first_expert + tl.zeros_like(offs)
        row_ok = h_ok & (local_id >= 0) & (local_id < E)
        if WEIGHTED:
            weight = tl.load(topk_w_ptr + pair).to(tl.float32)
        for s in range(SPLITS):
            y = tl.load(y_ptr + s * stride_ys + pair.to(tl.int64) * H + offs, mask=row_ok, other=0.0)
            if WEIGHTED:
                total += y.to(tl.float32) * weight
            else:
                total += y
    tl.store(out_ptr + token.to(tl.int64) * H + offs, total.to(out_ptr.dtype.element_ty), mask=h_ok)


def topk_sum(y: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor, experts: int, first_expert: int,
             topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``y`` ``[splits, M * k, H]`` (per K slice, per routed pair; rows contiguous) -> ``out``
    ``[M, H]``: each token's local pairs and slices added in fp32 in a fixed order, each times
    its router weight when ``topk_weights`` ``[M, k]`` is given (:func:`_topk_sum_kernel`).
    The sorted path's last launch, and the Humming backend's top-k reduction."""
    m, top_k = topk_ids.shape
    h = y.shape[-1]
    block_h = min(1024, triton.next_power_of_2(h))
    weighted = topk_weights is not None
    _topk_sum_kernel[(m, triton.cdiv(h, block_h))](
        y, topk_weights.contiguous() if weighted else y, topk_ids.contiguous(), out, h, first_expert,
        experts, y.shape[0], y.stride(0),
        TOP_K=top_k, BLOCK_H=block_h, WEIGHTED=weighted, num_warps=4,
    )
    return out


@triton.jit
def _gated(y, ACTIVATION: tl.constexpr, BLOCK_N: tl.constexpr):
    """``act(gate_n) * up_n`` of a ``[BLOCK_N]`` vector whose rows alternate gate/up."""
    gate, up = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
    if ACTIVATION == "silu":
        return gate * tl.sigmoid(gate) * up
    return 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)) * up


@triton.jit
def _last_of_split(partial_ptr, counter_ptr, v, offs, n_ok, row, N, SPLIT_K):
    """Split-K handshake of the unsorted kernels: store this K slice's fp32 partial ``v`` at
    ``partial[program_id(2), row, offs]`` (``[SPLIT_K, num_programs(0), N]``), count the
    arrival on ``counter_ptr``; returns (whether this program is the last of its tile, the sum
    of all slices in slice order: valid in the last program only). The last program resets
    the counter for the next call (graph replays)."""
    slice_stride = tl.num_programs(0).to(tl.int64) * N
    base = partial_ptr + row.to(tl.int64) * N + offs
    tl.store(base + tl.program_id(2) * slice_stride, v, mask=n_ok)
    tl.debug_barrier()  # every thread's partial is written before the release below
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    last = arrived == SPLIT_K - 1
    total = tl.zeros_like(v)
    if last:
        for s in range(SPLIT_K):
            total += tl.load(base + s * slice_stride, mask=n_ok, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(counter_ptr, 0)
    return last, total


@triton.jit(do_not_specialize=["first_expert", "CHUNKS_PER_SPLIT", "SPLIT_K"])
def _pair_up_kernel(
    x_ptr, w_ptr, s_ptr, gscale_ptr, iscale_ptr, out_ptr, partial_ptr, counter_ptr, ids_ptr,
    N, K, TOP_K, E, first_expert, stride_xm, stride_we, stride_wb, stride_se, stride_sc,
    stride_om, CHUNKS, CHUNKS_PER_SPLIT, SPLIT_K,
    BLOCK_N: tl.constexpr, ACTIVATION: tl.constexpr, K_EXACT: tl.constexpr,
    QUANT_X: tl.constexpr, DTYPE: tl.constexpr, MAG_SHIFT: tl.constexpr,
    SCALE_SHIFT: tl.constexpr, SCALE_BASE: tl.constexpr, UNFOLD: tl.constexpr,
):
    """Unsorted gate/up: program (pair p, row tile, K slice) reads its pair's expert straight
    from ``topk_ids`` (no sort) and stores ``out[p, n] = act(gate_n) * up_n`` for its
    ``BLOCK_N / 2`` outputs (rows interleaved gate/up as in :func:`_moe_gemm_kernel`). The
    pair's x row is column 0 of a 16-wide dot. Several K slices: fp32 partials, the last
    slice to arrive adds them in slice order and applies the epilogue."""
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    expert = tl.load(ids_ptr + p).to(tl.int32) - first_expert
    if (expert < 0) | (expert >= E):
        return  # a non-local pair: the down kernel skips it too
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_w = offs_n % N
    cols = tl.arange(0, 16)
    k_index = tl.arange(0, 16)[:, None]
    w_ptrs = word_tile_ptrs(w_ptr + expert.to(tl.int64) * stride_we, rows_w, stride_wb)
    s_ptrs = s_ptr + expert.to(tl.int64) * stride_se + rows_w
    x_ptrs = x_ptr + (p // TOP_K).to(tl.int64) * stride_xm + k_index + cols[None, :] * 0
    x_mask = (cols == 0)[None, :]
    gs, inv_gs = activation_scales(iscale_ptr + expert * 2, QUANT_X)
    gs_up, inv_gs_up = activation_scales(iscale_ptr + expert * 2 + 1, QUANT_X)
    chunk_start = pid_k * CHUNKS_PER_SPLIT
    chunk_end = tl.minimum(chunk_start + CHUNKS_PER_SPLIT, CHUNKS)
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    acc = mma_chunks(acc, w_ptrs, s_ptrs, x_ptrs, x_mask, k_index, chunk_start, chunk_end, K,
                     stride_sc, gs, inv_gs, gs_up, inv_gs_up, K_EXACT, QUANT_X, True,
                     DTYPE, MAG_SHIFT, SCALE_SHIFT, SCALE_BASE)
    v = tl.sum(tl.where(x_mask, acc, 0.0), axis=1)  # column 0: the pair
    shard = rows_w % 2
    scale = tl.load(gscale_ptr + expert * 2 + shard) * UNFOLD
    scale *= tl.where(shard == 0, inv_gs, inv_gs_up)
    offs_out = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    out_ptrs = out_ptr + p.to(tl.int64) * stride_om + offs_out
    out_ok = offs_out < N // 2
    if SPLIT_K == 1:
        tl.store(out_ptrs, _gated(v * scale, ACTIVATION, BLOCK_N).to(out_ptr.dtype.element_ty),
                 mask=out_ok)
    else:
        last, total = _last_of_split(partial_ptr, counter_ptr + p * tl.num_programs(1) + pid_n,
                                     v, offs_n, offs_n < N, p, N, SPLIT_K)
        if last:
            tl.store(out_ptrs,
                     _gated(total * scale, ACTIVATION, BLOCK_N).to(out_ptr.dtype.element_ty),
                     mask=out_ok)


@triton.jit(do_not_specialize=["first_expert", "ITERS_PER_SPLIT", "SPLIT_K"])
def _pair_down_kernel(
    h_ptr, w_ptr, s_ptr, gscale_ptr, iscale_ptr, out_ptr, partial_ptr, counter_ptr, ids_ptr,
    topk_w_ptr, N, K, TOP_K, E, first_expert, stride_hm, stride_we, stride_wb, stride_se,
    stride_sc, stride_om, CHUNKS, ITERS_PER_SPLIT, SPLIT_K,
    BLOCK_N: tl.constexpr, SLOTS: tl.constexpr, K_EXACT: tl.constexpr, QUANT_X: tl.constexpr,
    DTYPE: tl.constexpr, MAG_SHIFT: tl.constexpr, SCALE_SHIFT: tl.constexpr,
    SCALE_BASE: tl.constexpr, UNFOLD: tl.constexpr,
):
    """Unsorted down GEMM with the top-k sum fused: program (token, row tile, slice) runs one
    flat loop over its slice of the ``TOP_K x CHUNKS`` (slot j, chunk) iterations and
    accumulates slot j's product ``W_{e_j} h_{p_j}`` in column j of a ``[BLOCK_N, SLOTS]``
    dot (SLOTS >= top_k, >= 16), so each slot keeps its own fp32 sum; the epilogue scales
    column j by its expert's global scale and router weight and adds the columns (fp32, fixed
    order). Non-local slots load nothing and count zero. Slices split the slots as well as K
    (at M = 1 a token's slots are the only parallelism besides the row tiles); several
    slices: fp32 partials added by the last slice to arrive, in slice order."""
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_w = offs_n % N
    cols = tl.arange(0, SLOTS)
    k_index = tl.arange(0, 16)[:, None]
    w_offs = (rows_w // 16)[:, None] * stride_wb + (rows_w % 16)[:, None] * 16 \
        + tl.arange(0, 16)[None, :]  # as gemm.word_tile_ptrs, expert by expert below
    it_start = pid_k * ITERS_PER_SPLIT
    it_end = tl.minimum(it_start + ITERS_PER_SPLIT, TOP_K * CHUNKS)
    acc = tl.zeros((BLOCK_N, SLOTS), dtype=tl.float32)
    for it in range(it_start, it_end):
        j = it // CHUNKS
        c = it % CHUNKS
        p = token * TOP_K + j
        expert = tl.load(ids_ptr + p).to(tl.int32) - first_expert
        # Masks built from tensors (the interpreter mis-types a bool scalar & a tensor).
        expert_rows = expert + tl.zeros_like(rows_w)
        row_ok = (expert_rows >= 0) & (expert_rows < E)
        expert_cols = expert + tl.zeros_like(cols)
        x_mask = (cols == j) & (expert_cols >= 0) & (expert_cols < E)
        expert = tl.where((expert >= 0) & (expert < E), expert, 0).to(tl.int64)
        words = tl.load(w_ptr + expert * stride_we + w_offs + c * 256, mask=row_ok[:, None],
                        other=0)
        scale_word = tl.load(s_ptr + expert * stride_se + c * stride_sc + rows_w, mask=row_ok,
                             other=0)
        gs, inv_gs = activation_scales(iscale_ptr + expert, QUANT_X)
        x_ptrs = h_ptr + p.to(tl.int64) * stride_hm + k_index + cols[None, :] * 0
        acc = chunk_dot(acc, words.to(tl.uint32, bitcast=True), scale_word, x_ptrs,
                        x_mask[None, :], k_index, c, K, gs, inv_gs, gs, inv_gs,
                        K_EXACT, QUANT_X, False, DTYPE, MAG_SHIFT, SCALE_SHIFT, SCALE_BASE)
    # Column j's scale: global scale (x 1 / gs under W4A4) x fold x router weight; 0 if unused.
    pairs = token * TOP_K + cols
    experts = tl.load(ids_ptr + pairs, mask=cols < TOP_K, other=-1).to(tl.int32) - first_expert
    used = (cols < TOP_K) & (experts >= 0) & (experts < E)
    experts = tl.where(used, experts, 0)
    col_scale = tl.load(gscale_ptr + experts) * UNFOLD
    if QUANT_X:
        col_scale *= tl.math.div_rn(1.0, tl.math.div_rn(1.0, tl.load(iscale_ptr + experts)))
    col_scale *= tl.load(topk_w_ptr + pairs, mask=used, other=0.0).to(tl.float32)
    col_scale = tl.where(used, col_scale, 0.0)
    v = tl.sum(acc * col_scale[None, :], axis=1)
    out_ptrs = out_ptr + token.to(tl.int64) * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(out_ptrs, v.to(out_ptr.dtype.element_ty), mask=offs_n < N)
    else:
        last, total = _last_of_split(partial_ptr, counter_ptr + token * tl.num_programs(1) + pid_n,
                                     v, offs_n, offs_n < N, token, N, SPLIT_K)
        if last:
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@dataclass(frozen=True, eq=False)
class PreparedMoE:
    """The experts of one MoE layer in the kernel layout (``layout.py``).

    - ``gate_up_words`` int32 ``[E, 2I/16, Hp/128, 16, 16]``, ``gate_up_scales`` int64
      ``[E, Hp/128, 2I]``, rows interleaved: 2n = gate n, 2n + 1 = up n;
    - ``down_words`` int32 ``[E, H/16, Ip/128, 16, 16]``, ``down_scales`` int64
      ``[E, Ip/128, H]`` (row counts rounded up to 16);
    - ``gate_up_global`` float32 ``[E, 2]`` (gate, up), ``down_global`` float32 ``[E, 1]``;
    - ``gate_up_input``/``down_input``: the same shapes, W4A4 static input scales, or None;
    - ``counters`` int32 zeros: the unsorted path's split-K arrival counters (each call leaves
      them zero; a call needing more uses fresh zeros). So one PreparedMoE must not run on two
      streams at once.
    """

    gate_up_words: torch.Tensor
    gate_up_scales: torch.Tensor
    down_words: torch.Tensor
    down_scales: torch.Tensor
    gate_up_global: torch.Tensor
    down_global: torch.Tensor
    gate_up_input: torch.Tensor | None
    down_input: torch.Tensor | None
    experts: int
    hidden: int
    intermediate: int
    first_expert: int
    counters: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.gate_up_words, self.gate_up_scales, self.down_words, self.down_scales))


def prepare_moe(weights: MoEWeights) -> PreparedMoE:
    """Re-lay a MoE layer's NVFP4 experts for :func:`fused_moe`: gate and up rows interleaved
    (row 2n = gate n, 2n + 1 = up n), then the kernel layout of ``layout.py``."""
    gu, down = weights.gate_up, weights.down
    inter = weights.intermediate
    interleave = torch.arange(2 * inter, device=gu.packed.device).view(2, inter).T.flatten()
    has_input = gu.input_scale is not None and down.input_scale is not None
    gate_up_words, gate_up_scales = relayout(gu.packed[:, interleave],
                                             gu.block_scale[:, interleave])
    down_words, down_scales = relayout(down.packed, down.block_scale)
    return PreparedMoE(
        gate_up_words=gate_up_words,
        gate_up_scales=gate_up_scales,
        down_words=down_words,
        down_scales=down_scales,
        gate_up_global=gu.global_scale.contiguous(),
        down_global=down.global_scale.contiguous(),
        gate_up_input=gu.input_scale.contiguous() if has_input else None,
        down_input=down.input_scale.contiguous() if has_input else None,
        experts=weights.experts,
        hidden=weights.hidden,
        intermediate=inter,
        first_expert=weights.first_expert,
        counters=torch.zeros(_COUNTERS, dtype=torch.int32, device=gu.packed.device),
    )


_COUNTERS = 1 << 14
"""Split-K counters kept per PreparedMoE (64 KiB), enough for the unsorted path's small M."""


def fused_moe(
    x: torch.Tensor,
    prepared: PreparedMoE,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    quantize_activations: bool = False,
    variant: str | None = None,
) -> torch.Tensor:
    """The reference's fused-MoE contract (``backends/reference/moe.py``) on the GPU.

    ``x[M, H]`` bf16/fp16; ``topk_weights[M, k]`` any float dtype (applied in fp32);
    ``topk_ids[M, k]`` int32/int64 global expert ids (local expert e is global
    ``first_expert + e``; other ids contribute zero). Returns ``[M, H]`` in x.dtype. No host
    synchronization: capturable in a CUDA graph. Raises NumericsError for a wrong dtype or
    shape, an unknown activation or variant, or W4A4 without input scales.

    ``variant``: None picks the path by M (``configs.moe_variant``); ``"sorted"`` or
    ``"unsorted"`` (``configs.MOE_VARIANTS``) forces one; both are valid at every M.
    """
    check_activations(x, prepared.hidden, "triton_nvfp4 fused_moe")
    if x.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise NumericsError(
            f"fused_moe needs x [M, H] and topk_weights, topk_ids [M, k]; found "
            f"{tuple(x.shape)}, {tuple(topk_weights.shape)}, {tuple(topk_ids.shape)}"
        )
    if activation not in ACTIVATIONS:
        raise NumericsError(f"activation {activation!r} is not one of {ACTIVATIONS}")
    if quantize_activations and prepared.gate_up_input is None:
        raise NumericsError(
            "W4A4 emulation needs the checkpoint's input scales; these experts have none "
            "(serve them weight-only: quantize_activations=False)"
        )
    if variant is not None and variant not in configs.MOE_VARIANTS:
        raise NumericsError(f"variant {variant!r} is not one of {configs.MOE_VARIANTS}")
    m, top_k = topk_ids.shape
    h, inter = prepared.hidden, prepared.intermediate
    out = torch.empty(m, h, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    topk_ids = topk_ids.contiguous()
    if variant is None:
        variant = configs.moe_variant(m, prepared.experts, top_k)
    if variant == "unsorted":
        _unsorted(x, prepared, topk_weights.contiguous(), topk_ids, out, activation,
                  quantize_activations)
        return out
    cfg = configs.moe_config(m, prepared.experts, h, inter, top_k)
    routing = align(topk_ids, prepared.experts, prepared.first_expert, cfg.block_m)
    pairs = routing.pairs
    decode = DECODE[x.dtype]
    # Per-pair intermediates in x.dtype (halves the bytes of the down GEMM's output and of the
    # top-k sum); fp32 for the down GEMM's K slices, and under W4A4 emulation, which the
    # reference quantizes from fp32.
    hidden = torch.empty(pairs, inter, dtype=torch.float32 if quantize_activations else x.dtype,
                         device=x.device)
    down_chunks = padded_k(inter) // CHUNK_K
    per_split = triton.cdiv(down_chunks, cfg.down.split_k)
    splits = triton.cdiv(down_chunks, per_split)
    routed = torch.empty(splits, pairs, h, dtype=torch.float32 if splits > 1 else hidden.dtype,
                         device=x.device)
    stages = (
        (x, prepared.gate_up_words, prepared.gate_up_scales, prepared.gate_up_global,
         prepared.gate_up_input, hidden[None], 2 * inter, h, cfg.up, True, 1),
        (hidden, prepared.down_words, prepared.down_scales, prepared.down_global,
         prepared.down_input, routed, h, inter, cfg.down, False, splits),
    )
    for a, words, scales, gscale, iscale, dest, n, k, tile, gated, split in stages:
        chunks = padded_k(k) // CHUNK_K
        grid = (routing.blocks, triton.cdiv(n, tile.block_n), split)
        _moe_gemm_kernel[grid](
            a, words, scales, gscale, iscale if quantize_activations else gscale, dest,
            routing.sorted_pairs, routing.block_ends, topk_weights.contiguous(),
            n, k, pairs, top_k, prepared.experts, a.stride(0), words.stride(0), words.stride(1),
            scales.stride(0), scales.stride(1), dest.stride(0), dest.stride(1), chunks,
            triton.cdiv(chunks, split), LOG2_E=prepared.experts.bit_length(),
            BLOCK_N=tile.block_n, BLOCK_M=cfg.block_m, GATED=gated, ACTIVATION=activation,
            K_EXACT=k % CHUNK_K == 0, QUANT_X=quantize_activations,
            DTYPE=decode.dtype, MAG_SHIFT=decode.mag_shift, SCALE_SHIFT=decode.scale_shift,
            SCALE_BASE=decode.scale_base, UNFOLD=decode.unfold,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )
    return topk_sum(routed, topk_ids, out, prepared.experts, prepared.first_expert)


def _unsorted(x, prepared, topk_weights, topk_ids, out, activation, quantize_activations,
              cfg: configs.PairConfig | None = None):
    """The unsorted path (two launches): :func:`_pair_up_kernel` then :func:`_pair_down_kernel`
    (top-k sum fused)."""
    m, top_k = topk_ids.shape
    pairs = m * top_k
    h, inter, experts = prepared.hidden, prepared.intermediate, prepared.experts
    if cfg is None:
        cfg = configs.pair_config(experts, h, inter, top_k)
    decode = DECODE[x.dtype]
    hidden = torch.empty(pairs, inter, dtype=torch.float32 if quantize_activations else x.dtype,
                         device=x.device)
    up_chunks, down_chunks = padded_k(h) // CHUNK_K, padded_k(inter) // CHUNK_K
    up_tiles, down_tiles = triton.cdiv(2 * inter, cfg.up.block_n), triton.cdiv(h, cfg.down.block_n)
    up_per = triton.cdiv(up_chunks, configs.pair_split(cfg.up, pairs, 2 * inter, up_chunks))
    up_split = triton.cdiv(up_chunks, up_per)
    down_iters = top_k * down_chunks  # the down kernel's slices split (slot, chunk) pairs
    down_per = triton.cdiv(down_iters, configs.pair_split(cfg.down, m, h, down_iters))
    down_split = triton.cdiv(down_iters, down_per)
    up_counters = pairs * up_tiles if up_split > 1 else 0
    down_counters = m * down_tiles if down_split > 1 else 0
    counters = prepared.counters
    if counters is None or counters.numel() < up_counters + down_counters:
        counters = torch.zeros(up_counters + down_counters, dtype=torch.int32, device=x.device)
    partial = torch.empty(max(up_split * pairs * 2 * inter if up_split > 1 else 0,
                              down_split * m * h if down_split > 1 else 0, 1),
                          dtype=torch.float32, device=x.device)
    common = dict(DTYPE=decode.dtype, MAG_SHIFT=decode.mag_shift, SCALE_SHIFT=decode.scale_shift,
                  SCALE_BASE=decode.scale_base, UNFOLD=decode.unfold, QUANT_X=quantize_activations)
    gate_up_input = prepared.gate_up_input if quantize_activations else prepared.gate_up_global
    _pair_up_kernel[(pairs, up_tiles, up_split)](
        x, prepared.gate_up_words, prepared.gate_up_scales, prepared.gate_up_global,
        gate_up_input, hidden, partial, counters, topk_ids,
        2 * inter, h, top_k, experts, prepared.first_expert, x.stride(0),
        prepared.gate_up_words.stride(0), prepared.gate_up_words.stride(1),
        prepared.gate_up_scales.stride(0), prepared.gate_up_scales.stride(1), hidden.stride(0),
        up_chunks, up_per, up_split,
        BLOCK_N=cfg.up.block_n, ACTIVATION=activation, K_EXACT=h % CHUNK_K == 0,
        num_warps=cfg.up.num_warps, num_stages=cfg.up.num_stages, **common,
    )
    down_input = prepared.down_input if quantize_activations else prepared.down_global
    _pair_down_kernel[(m, down_tiles, down_split)](
        hidden, prepared.down_words, prepared.down_scales, prepared.down_global, down_input,
        out, partial, counters[up_counters:], topk_ids, topk_weights,
        h, inter, top_k, experts, prepared.first_expert, hidden.stride(0),
        prepared.down_words.stride(0), prepared.down_words.stride(1),
        prepared.down_scales.stride(0), prepared.down_scales.stride(1), out.stride(0),
        down_chunks, down_per, down_split,
        BLOCK_N=cfg.down.block_n, SLOTS=max(16, triton.next_power_of_2(top_k)),
        K_EXACT=inter % CHUNK_K == 0,
        num_warps=cfg.down.num_warps, num_stages=cfg.down.num_stages, **common,
    )
