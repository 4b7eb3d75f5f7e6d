"""The reference backend against independent naive computations on dequantized weights."""

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from quantoracle.backends.reference.linear import linear
from quantoracle.backends.reference.moe import fused_moe
from quantoracle.schemes import nvfp4
from quantoracle.schemes.tensors import MoEWeights, NVFP4Tensor


def naive_moe(x, w13, w2, topk_weights, topk_ids, first_expert=0, act=F.silu, qdq=None):
    """Per token, per routed expert, in float64, on dequantized float weights."""
    x = x.double()
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    inter = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j]) - first_expert
            if not 0 <= e < w13.shape[0]:
                continue
            xg = xu = x[t]
            if qdq:
                xg, xu = qdq(x[t], e, 0), qdq(x[t], e, 1)
            g = w13[e, :inter].double() @ xg
            u = w13[e, inter:].double() @ xu
            h = act(g) * u
            if qdq:
                h = qdq(h, e, 2)
            out[t] += float(topk_weights[t, j]) * (w2[e].double() @ h)
    return out


@st.composite
def moe_case(draw):
    experts = draw(st.integers(1, 6))
    hidden = 16 * draw(st.integers(1, 5))
    inter = 16 * draw(st.integers(1, 4))
    tokens = draw(st.integers(1, 9))
    top_k = draw(st.integers(1, experts))
    local = draw(st.integers(1, experts))
    first = draw(st.integers(0, experts - local))
    seed = draw(st.integers(0, 2**31 - 1))
    return experts, hidden, inter, tokens, top_k, local, first, seed


def build(local, hidden, inter, gen, w4a4=False):
    gate_up = torch.randn(local, 2 * inter, hidden, generator=gen) * 0.1
    down = torch.randn(local, hidden, inter, generator=gen) * 0.1
    amax = (torch.rand(local, 3, generator=gen) + 0.5) * 4 if w4a4 else None
    return MoEWeights(
        NVFP4Tensor.quantize(gate_up, shards=2, input_amax=None if amax is None else amax[:, :2]),
        NVFP4Tensor.quantize(down, input_amax=None if amax is None else amax[:, 2:]),
    )


@given(moe_case(), st.booleans())
def test_reference_moe_equals_a_naive_loop(case, w4a4):
    experts, hidden, inter, tokens, top_k, local, first, seed = case
    gen = torch.Generator().manual_seed(seed)
    base = build(local, hidden, inter, gen, w4a4)
    weights = MoEWeights(base.gate_up, base.down, first_expert=first)
    x = torch.randn(tokens, hidden, generator=gen)
    topk_ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    topk_weights = torch.rand(tokens, top_k, generator=gen)
    got = fused_moe(x, weights, topk_weights, topk_ids, quantize_activations=w4a4)

    qdq = None
    if w4a4:
        scales = torch.cat([weights.gate_up.input_scale, weights.down.input_scale], dim=1)
        qdq = lambda v, e, i: nvfp4.fake_quantize_activation(v.float(), scales[e, i]).double()  # noqa: E731
    want = naive_moe(x, weights.gate_up.dequantize(), weights.down.dequantize(), topk_weights, topk_ids, first, qdq=qdq)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    routed_locally = ((topk_ids >= first) & (topk_ids < first + local)).any(dim=1)
    assert torch.all(got[~routed_locally] == 0)


def test_reference_moe_gate_and_up_may_carry_different_global_scales():
    gen = torch.Generator().manual_seed(1)
    gate, up = torch.randn(2, 32, 64, generator=gen) * 0.1, torch.randn(2, 32, 64, generator=gen) * 3
    parts = [NVFP4Tensor.quantize(w) for w in (gate, up)]
    gate_up = NVFP4Tensor(
        torch.cat([p.packed for p in parts], 1), torch.cat([p.block_scale for p in parts], 1),
        torch.cat([p.global_scale for p in parts], 1),
    )
    assert not torch.equal(gate_up.global_scale[:, 0], gate_up.global_scale[:, 1])
    weights = MoEWeights(gate_up, NVFP4Tensor.quantize(torch.randn(2, 64, 32, generator=gen) * 0.1))
    x = torch.randn(3, 64, generator=gen)
    ids, tw = torch.tensor([[0, 1], [1, 0], [1, 1]]), torch.rand(3, 2, generator=gen)
    want = naive_moe(x, torch.cat([p.dequantize() for p in parts], 1), weights.down.dequantize(), tw, ids)
    torch.testing.assert_close(fused_moe(x, weights, tw, ids).double(), want, rtol=1e-5, atol=1e-5)


@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 6), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_reference_linear_equals_matmul(m, n16, k16, dtype):
    gen = torch.Generator().manual_seed(m * 100 + n16 * 10 + k16)
    w = NVFP4Tensor.quantize(torch.randn(16 * n16, 16 * k16, generator=gen))
    x = torch.randn(m, 16 * k16, generator=gen).to(dtype)
    want = (x.double() @ w.dequantize().double().T).to(dtype)
    got = linear(x, w)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
