"""Reference NVFP4 Linear: dequantize the weight to float32 and multiply, on any device."""

from __future__ import annotations

import torch

from quantoracle.schemes import nvfp4
from quantoracle.schemes.tensors import NVFP4Tensor


def quantize_input(x: torch.Tensor, weight: NVFP4Tensor, quantize_activations: bool) -> list[torch.Tensor]:
    """The float32 input each row shard of ``weight`` sees: ``x`` itself (weight-only), or ``x``
    quantized-dequantized with that shard's static ``input_scale`` (exact W4A4 emulation)."""
    if not quantize_activations:
        return [x.float()] * weight.shards
    if weight.input_scale is None:
        raise ValueError("W4A4 emulation needs the checkpoint's input_scale; this weight has none")
    return [nvfp4.fake_quantize_activation(x, scale) for scale in weight.input_scale.unbind(-1)]


def linear(
    x: torch.Tensor, weight: NVFP4Tensor, *, quantize_activations: bool = False
) -> torch.Tensor:
    """``x[..., K] @ W[N, K]^T`` in float32, returned in ``x.dtype``.

    ``weight`` is a Linear's NVFP4 tensor (no lead dims). With ``quantize_activations`` each row
    shard's input is quantized to NVFP4 with its ``input_scale`` first (W4A4 numerics).
    """
    w = weight.dequantize(torch.float32)
    inputs = quantize_input(x, weight, quantize_activations)
    rows = weight.rows // weight.shards
    outs = [xs @ w[i * rows : (i + 1) * rows].T for i, xs in enumerate(inputs)]
    return torch.cat(outs, dim=-1).to(x.dtype)
