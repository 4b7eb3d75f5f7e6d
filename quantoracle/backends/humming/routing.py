"""quantoracle's side of the Humming fused MoE, in Triton (no host synchronization).

Humming's indexed expert GEMM reads a routing as vLLM's ``moe_align_block_size`` writes it:
``sorted_ids`` int32 (pair ids ``token * top_k + slot`` grouped by expert in blocks of
``block_m``, padding ids >= pairs), ``expert_ids`` int32 (one expert per block) and
``num_tokens_padded`` int32 ``[1]`` (blocks in use * block_m). quantoracle's own sort
(:func:`quantoracle.backends.triton_nvfp4.align.align`) writes the first and per-expert block
ends; :func:`indexed_routing` derives the other two. Humming has no top-k reduction in its API:
the backend uses triton_nvfp4's (``moe.topk_sum`` with the router weights), which adds each
token's local pairs, scaled by their router weights, in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantoracle.backends.triton_nvfp4.align import align, block_expert

_CHUNK = 1024


@dataclass(frozen=True)
class IndexedRouting:
    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_padded: torch.Tensor
    block_m: int


@triton.jit
def _block_experts_kernel(block_ends_ptr, expert_ids_ptr, padded_ptr, E, BLOCKS,
                          BLOCK_M: tl.constexpr, LOG2_E: tl.constexpr, CHUNK: tl.constexpr):
    """``expert_ids[b]`` = the local expert owning block b (E - 1 past the blocks in use, which
    Humming never reads); program 0 writes ``blocks in use * BLOCK_M``."""
    blocks = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    expert = block_expert(block_ends_ptr, blocks, E, LOG2_E)
    tl.store(expert_ids_ptr + blocks, tl.minimum(expert, E - 1), mask=blocks < BLOCKS)
    if tl.program_id(0) == 0:
        used = tl.load(block_ends_ptr + E - 1)
        tl.store(padded_ptr, used * BLOCK_M)


def indexed_routing(topk_ids: torch.Tensor, experts: int, first_expert: int, block_m: int) -> IndexedRouting:
    """Sort ``topk_ids`` (``[M, k]`` global ids) by local expert ``id - first_expert`` into
    blocks of ``block_m``; pairs of non-local experts appear nowhere (so they are computed by
    neither GEMM)."""
    routing = align(topk_ids, experts, first_expert, block_m)
    expert_ids = torch.empty(routing.blocks, dtype=torch.int32, device=topk_ids.device)
    padded = torch.empty(1, dtype=torch.int32, device=topk_ids.device)
    _block_experts_kernel[(triton.cdiv(routing.blocks, _CHUNK),)](
        routing.block_ends, expert_ids, padded, experts, routing.blocks,
        BLOCK_M=block_m, LOG2_E=experts.bit_length(), CHUNK=_CHUNK, num_warps=4,
    )
    return IndexedRouting(routing.sorted_pairs, expert_ids, padded, block_m)
