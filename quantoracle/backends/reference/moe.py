"""Reference NVFP4 fused MoE, one expert at a time (never the whole layer in 16-bit)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantoracle.backends.reference.linear import linear
from quantoracle.schemes.tensors import MoEWeights

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


def fused_moe(
    x: torch.Tensor,
    weights: MoEWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    quantize_activations: bool = False,
) -> torch.Tensor:
    """The fused-MoE contract every MoE backend implements.

    ``x[M, H]``; ``topk_weights[M, k]`` (any float dtype, applied in float32); ``topk_ids[M, k]``
    global expert ids. Local expert ``e`` is global ``weights.first_expert + e``; a token routed
    to an expert that is not local contributes zero. Per routed (token, expert):
    ``down(act(gate(x)) * up(x))`` scaled by its router weight, summed over k, in float32;
    returned ``[M, H]`` in ``x.dtype``. With ``quantize_activations``, the inputs of gate, up
    and down are quantized to NVFP4 with their static input scales (W4A4 numerics).
    """
    act = ACTIVATIONS[activation]
    out = torch.zeros(x.shape[0], weights.hidden, dtype=torch.float32, device=x.device)
    local = topk_ids.long() - weights.first_expert
    inter = weights.intermediate
    for e in torch.unique(local[(local >= 0) & (local < weights.experts)]).tolist():
        token, slot = (local == e).nonzero(as_tuple=True)
        xe = x[token].float()
        gate_up = linear(xe, weights.gate_up.select(e), quantize_activations=quantize_activations)
        hidden = act(gate_up[:, :inter]) * gate_up[:, inter:]
        y = linear(hidden, weights.down.select(e), quantize_activations=quantize_activations)
        out.index_add_(0, token, y * topk_weights[token, slot].float().unsqueeze(-1))
    return out.to(x.dtype)
