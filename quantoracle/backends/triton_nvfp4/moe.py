"""W4A16 NVFP4 fused MoE in Triton: four launches, no host synchronization.

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

The K loop and the in-register dequantization are ``gemm.mma_chunks`` (see ``gemm.py``).
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
def _topk_sum_kernel(y_ptr, topk_ids_ptr, out_ptr, H, first_expert, E, SPLITS, stride_ys,
                     TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """``out[t, :] = sum over local slots j and K slices s of y[s, t * TOP_K + j, :]`` in fp32,
    in a fixed order."""
    token = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs < H
    total = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        local_id = tl.load(topk_ids_ptr + pair).to(tl.int32) - first_expert + tl.zeros_like(offs)
        row_ok = h_ok & (local_id >= 0) & (local_id < E)
        for s in range(SPLITS):
            total += tl.load(y_ptr + s * stride_ys + pair.to(tl.int64) * H + offs, mask=row_ok,
                             other=0.0)
    tl.store(out_ptr + token.to(tl.int64) * H + offs, total.to(out_ptr.dtype.element_ty), mask=h_ok)


@dataclass(frozen=True, eq=False)
class PreparedMoE:
    """The experts of one MoE layer in the kernel layout (``layout.py``).

    - ``gate_up_words`` int32 ``[E, 2I/16, Hp/128, 16, 16]``, ``gate_up_scales`` int64
      ``[E, Hp/128, 2I]``, rows interleaved: 2n = gate n, 2n + 1 = up n;
    - ``down_words`` int32 ``[E, H/16, Ip/128, 16, 16]``, ``down_scales`` int64
      ``[E, Ip/128, H]`` (row counts rounded up to 16);
    - ``gate_up_global`` float32 ``[E, 2]`` (gate, up), ``down_global`` float32 ``[E, 1]``;
    - ``gate_up_input``/``down_input``: the same shapes, W4A4 static input scales, or None.
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
    )


def fused_moe(
    x: torch.Tensor,
    prepared: PreparedMoE,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    quantize_activations: bool = False,
) -> torch.Tensor:
    """The reference's fused-MoE contract (``backends/reference/moe.py``) on the GPU.

    ``x[M, H]`` bf16/fp16; ``topk_weights[M, k]`` any float dtype (applied in fp32);
    ``topk_ids[M, k]`` int32/int64 global expert ids (local expert e is global
    ``first_expert + e``; other ids contribute zero). Returns ``[M, H]`` in x.dtype. No host
    synchronization: capturable in a CUDA graph. Raises NumericsError for a wrong dtype or
    shape, an unknown activation, or W4A4 without input scales.
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
    m, top_k = topk_ids.shape
    h, inter = prepared.hidden, prepared.intermediate
    out = torch.empty(m, h, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    topk_ids = topk_ids.contiguous()
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
    block_h = min(1024, triton.next_power_of_2(h))
    _topk_sum_kernel[(m, triton.cdiv(h, block_h))](
        routed, topk_ids, out, h, prepared.first_expert, prepared.experts, splits,
        routed.stride(0),
        TOP_K=top_k, BLOCK_H=block_h, num_warps=4,
    )
    return out
