"""Bad input to a layer is refused at its boundary with an InputError that names the tensor, what
was found and what was expected (issue 15, items 2 and 3); good input still runs."""

from __future__ import annotations

import pytest
import torch

from quantoracle.errors import InputError
from quantoracle.layer_inputs import CHECK_INPUTS, check_routed_input, value_checks_enabled
from quantoracle.layers import NVFP4FusedMoE, NVFP4Linear
from quantoracle.schemes.checkpoint import Checkpoint, write_checkpoint

E, H, I, TOP_K, M = 4, 32, 32, 2, 5


@pytest.fixture(scope="module")
def linear() -> NVFP4Linear:
    torch.manual_seed(0)
    return NVFP4Linear.from_float(torch.randn(48, 64), dtype=torch.float32, name="proj")


@pytest.fixture(scope="module")
def moe() -> NVFP4FusedMoE:
    torch.manual_seed(0)
    return NVFP4FusedMoE.from_float(
        torch.randn(E, 2 * I, H), torch.randn(E, H, I), top_k=TOP_K, dtype=torch.float32, name="experts"
    )


@pytest.fixture
def routed():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(M, H, generator=generator)
    weights = torch.rand(M, TOP_K, generator=generator)
    ids = torch.stack([torch.randperm(E, generator=generator)[:TOP_K] for _ in range(M)])
    return x, weights, ids


# ---- NVFP4Linear ----


@pytest.mark.parametrize(
    "x, found",
    [
        (torch.randn(3, 60), r"\[3, 60\]; expected \[\.\.\., 64\]"),
        (torch.randn(64), r"\[64\]; expected \[\.\.\., 64\] with at least one token dimension.*unsqueeze"),
        (torch.randint(0, 5, (3, 64)), r"torch\.int64"),
        (torch.ones(3, 64, dtype=torch.bool), r"torch\.bool"),
    ],
    ids=["hidden size", "1-D", "int", "bool"],
)
def test_linear_refuses_bad_input(linear, x, found):
    with pytest.raises(InputError, match=rf"NVFP4Linear 'proj': x .*{found}"):
        linear(x)


def test_linear_accepts_other_float_dtypes_and_leading_dims(linear):
    x = torch.randn(2, 3, 64)
    expected = linear(x)
    assert expected.shape == (2, 3, 48)
    torch.testing.assert_close(linear(x.to(torch.float64)), expected)


def test_linear_from_float_refuses_a_stack_of_experts():
    with pytest.raises(InputError, match=r"weight has shape \[2, 32, 64\]; expected \[N, K\].*NVFP4FusedMoE"):
        NVFP4Linear.from_float(torch.randn(2, 32, 64))
    with pytest.raises(InputError, match="torch.int32"):
        NVFP4Linear.from_float(torch.ones(32, 64, dtype=torch.int32))


def test_moe_from_float_refuses_2d_experts():
    with pytest.raises(InputError, match=r"gate_up has shape \[64, 32\]; expected \[E, rows, K\]"):
        NVFP4FusedMoE.from_float(torch.randn(2 * I, H), torch.randn(E, H, I), top_k=TOP_K)


# ---- NVFP4FusedMoE ----


def test_routed_moe_runs_on_good_input(moe, routed):
    x, weights, ids = routed
    assert moe.forward_routed(x, weights, ids).shape == (M, H)
    assert moe.forward_routed(x, weights, ids.int()).shape == (M, H)


@pytest.mark.parametrize(
    "change, found",
    [
        (lambda x, w, i: (x, w, i + E), rf"topk_ids holds expert ids in \[\d, \d\]; expected \[0, {E - 1}\]"),
        (lambda x, w, i: (x, w, i - 1 - i.max()), rf"topk_ids holds expert ids in \[-\d, -1\]; expected \[0, 3\]"),
        (lambda x, w, i: (x, w, i.float()), r"topk_ids has dtype torch\.float32.*integer"),
        (lambda x, w, i: (x, w[:-1], i[:-1]), rf"topk_weights has shape \[{M - 1}, 2\]; expected \[{M}, 2\]"),
        (lambda x, w, i: (x, w, i[:, :1]), rf"topk_ids has shape \[{M}, 1\]; expected \[{M}, 2\]"),
        (lambda x, w, i: (x, w.long(), i), r"topk_weights has dtype torch\.int64"),
        (lambda x, w, i: (x[:, :-1], w, i), rf"x has shape \[{M}, {H - 1}\]; expected \[M, {H}\]"),
        (lambda x, w, i: (x[None], w, i), rf"x has shape \[1, {M}, {H}\]; expected \[M, {H}\].*reshape"),
        (lambda x, w, i: (x.long(), w, i), r"x has dtype torch\.int64"),
    ],
    ids=["ids >= E", "ids < 0", "float ids", "rows", "columns", "int weights", "hidden", "3-D x", "int x"],
)
def test_routed_moe_refuses_bad_routing(moe, routed, change, found):
    with pytest.raises(InputError, match=rf"NVFP4FusedMoE 'experts': {found}"):
        moe.forward_routed(*change(*routed))


@pytest.mark.parametrize(
    "logits, found",
    [
        (torch.randn(M, E - 1), rf"router_logits has shape \[{M}, {E - 1}\]; expected \[{M}, {E}\]"),
        (torch.randn(M + 2, E), rf"router_logits has shape \[{M + 2}, {E}\]; expected \[{M}, {E}\]"),
        (torch.randint(0, 3, (M, E)), r"router_logits has dtype torch\.int64"),
    ],
    ids=["width", "more rows than tokens", "int"],
)
def test_moe_refuses_bad_router_logits(moe, routed, logits, found):
    with pytest.raises(InputError, match=found):
        moe(routed[0], logits)


def test_range_check_runs_on_cpu_and_elsewhere_only_when_asked(monkeypatch, moe, routed):
    x, weights, ids = routed
    meta = torch.empty(M, TOP_K, dtype=torch.int64, device="meta")  # values that cannot be read
    monkeypatch.delenv(CHECK_INPUTS, raising=False)
    assert value_checks_enabled(ids) and not value_checks_enabled(meta)
    check_routed_input(moe, x, weights, meta)  # metadata only: no read, no sync
    monkeypatch.setenv(CHECK_INPUTS, "1")
    assert value_checks_enabled(meta)
    with pytest.raises(RuntimeError, match="meta"):  # now it reads the values
        check_routed_input(moe, x, weights, meta)


# ---- from_checkpoint with the other kind's name ----


def test_from_checkpoint_names_the_right_class(tmp_path):
    torch.manual_seed(0)
    state = {
        "model.layers.0.self_attn.o_proj.weight": torch.randn(32, 32),
        **{
            f"model.layers.0.mlp.experts.{e}.{p}.weight": torch.randn(32, 32)
            for e in range(E) for p in ("gate_proj", "up_proj", "down_proj")
        },
    }
    directory = write_checkpoint(tmp_path / "ckpt", state, "w4a16_nvfp4", progress=False)
    with Checkpoint.open(directory) as checkpoint:
        with pytest.raises(InputError, match=r"is a MoE block \(4 experts\); use NVFP4FusedMoE\.from_checkpoint"):
            NVFP4Linear.from_checkpoint(checkpoint, "model.layers.0.mlp.experts", dtype=torch.float32)
        with pytest.raises(InputError, match=r"is a Linear \[32, 32\], not a MoE block; use NVFP4Linear\."):
            NVFP4FusedMoE.from_checkpoint(checkpoint, "model.layers.0.self_attn.o_proj", top_k=TOP_K)
        assert NVFP4Linear.from_checkpoint(checkpoint, "model.layers.0.self_attn.o_proj").out_features == 32
