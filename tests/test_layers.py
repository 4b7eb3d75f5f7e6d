"""The layer modules: resolve once on their device, prepare once, apply per call."""

import pytest
import torch
import torch.nn.functional as F

from quantoracle import NVFP4FusedMoE, NVFP4Linear, W4A4_NVFP4, W4A16_NVFP4
from quantoracle.oracle import ForcedBackendError


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_linear_resolves_on_its_device_and_matches_the_dequantized_matmul(gen):
    w = torch.randn(48, 64, generator=gen) * 0.05
    bias = torch.randn(48, generator=gen)
    layer = NVFP4Linear.from_float(w, bias, dtype=torch.float32)
    assert layer.backend == "reference" and layer.resolution.problem.device.platform == "cpu"
    assert "backend=reference" in repr(layer) and "scheme=w4a16_nvfp4" in repr(layer)
    x = torch.randn(5, 64, generator=gen)
    want = x @ layer.prepared.state.dequantize().T + bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    # close to the float layer it was quantized from (random weights: NVFP4's ~10% RMS error)
    err = ((layer(x) - bias) - x @ w.T).norm() / (x @ w.T).norm()
    assert err < 0.2


def test_w4a4_layer_follows_the_fallback_policy(gen):
    w = torch.randn(32, 64, generator=gen)
    x = torch.randn(4, 64, generator=gen) * 2
    weight_only = NVFP4Linear.from_float(w, scheme=W4A4_NVFP4, input_amax=8.0, dtype=torch.float32)
    emulated = NVFP4Linear.from_float(
        w, scheme=W4A4_NVFP4, input_amax=8.0, dtype=torch.float32, activation_fallback="emulate"
    )
    assert weight_only.resolution.fallback == "weight_only" and "fallback=weight_only" in repr(weight_only)
    assert emulated.resolution.fallback == "emulate" and emulated.prepared.quantize_activations
    assert not torch.equal(weight_only(x), emulated(x))
    with pytest.raises(ValueError, match="input_amax"):
        NVFP4Linear.from_float(w, scheme=W4A4_NVFP4)


def test_forcing_a_backend_that_cannot_run_here_is_an_error(gen):
    with pytest.raises(ForcedBackendError, match="platform"):
        NVFP4Linear.from_float(torch.randn(16, 32, generator=gen), force="triton_nvfp4", dtype=torch.bfloat16)


def test_moe_routes_like_qwen3_and_mixtral(gen):
    experts, hidden, inter, top_k = 8, 32, 16, 2
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.1
    down = torch.randn(experts, hidden, inter, generator=gen) * 0.1
    moe = NVFP4FusedMoE.from_float(gate_up, down, top_k=top_k, dtype=torch.float32)
    assert moe.backend == "reference" and "experts=8, top_k=2" in repr(moe)
    x, logits = torch.randn(6, hidden, generator=gen), torch.randn(6, experts, generator=gen)
    # Mixtral: softmax over the top-k logits; Qwen3 (norm_topk_prob): softmax, top-k, renormalize
    top_logits, ids = torch.topk(logits, top_k)
    weights = torch.softmax(top_logits, dim=-1)
    got_w, got_ids = moe.route(logits)
    torch.testing.assert_close(got_w, weights)
    assert torch.equal(got_ids, ids)
    w13 = moe.prepared.state.gate_up.dequantize()
    w2 = moe.prepared.state.down.dequantize()
    want = torch.zeros(6, hidden)
    for t in range(6):
        for j in range(top_k):
            e = ids[t, j]
            want[t] += weights[t, j] * (w2[e] @ (F.silu(w13[e, :inter] @ x[t]) * (w13[e, inter:] @ x[t])))
    torch.testing.assert_close(moe(x, logits), want, rtol=1e-4, atol=1e-5)


def test_moe_in_bf16_on_cpu(gen):
    moe = NVFP4FusedMoE.from_float(
        torch.randn(4, 32, 32, generator=gen), torch.randn(4, 32, 16, generator=gen), top_k=2, scheme=W4A16_NVFP4
    )
    y = moe(torch.randn(3, 32, generator=gen), torch.randn(3, 4, generator=gen))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 32) and torch.isfinite(y).all()
