"""``quantoracle quantize`` and ``quantoracle resolve PATH`` on real checkpoint directories."""

import json

import pytest
import torch
from safetensors.torch import save_file

from quantoracle import demo
from quantoracle.cli import main

CFG = demo.ToyConfig(layers=2, experts=8, hidden=64, intermediate=32, top_k=2, tokens=8)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    src = tmp_path_factory.mktemp("bf16")
    save_file(demo.make_model(CFG), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "toy", "num_experts_per_tok": CFG.top_k}))
    return src


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_then_resolve_on_hopper(bf16_dir, tmp_path, capsys):
    dst = tmp_path / "nvfp4"
    code, out, _ = run(capsys, "quantize", bf16_dir, dst, "--scheme", "w4a16_nvfp4")
    assert code == 0 and (dst / "hf_quant_config.json").is_file()
    code, out, _ = run(capsys, "resolve", dst, "--device", "sm90", "--json")
    data = json.loads(out)
    assert code == 0 and data["top_k"] == CFG.top_k
    groups = {(g["problem"]["kind"], g["backend"]): g["layers"] for g in data["groups"]}
    assert groups["moe", "triton_nvfp4"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert len(groups["linear", "triton_nvfp4"]) == CFG.layers
    code, out, _ = run(capsys, "resolve", dst, "--device", "cpu", "--dtype", "float32")
    assert code == 0 and "reference" in out and "[platform]" in out


def test_w4a4_checkpoint_resolves_with_policy_override_and_per_layer_force(bf16_dir, tmp_path, capsys):
    amax = tmp_path / "amax.json"
    state = demo.make_model(CFG)
    model = demo.FloatModel(CFG, state, torch.device("cpu"))
    model(torch.randn(CFG.tokens, CFG.hidden))
    amax.write_text(json.dumps(model.amax))
    dst = tmp_path / "w4a4"
    assert run(capsys, "quantize", bf16_dir, dst, "--scheme", "w4a4_nvfp4", "--input-amax", amax)[0] == 0

    code, out, _ = run(capsys, "resolve", dst, "--device", "sm90", "--json")
    assert {g["fallback"] for g in json.loads(out)["groups"]} == {"weight_only"}
    code, out, _ = run(capsys, "resolve", dst, "--device", "sm90", "--override-activation", "none", "--json")
    assert {(g["scheme"], g["fallback"]) for g in json.loads(out)["groups"]} == {("w4a16_nvfp4", None)}
    code, out, _ = run(capsys, "resolve", dst, "--device", "sm90", "--activation-fallback", "error")
    assert code == 1 and "NONE" in out
    # a per-layer force names only MoE blocks; the Linear layers resolve as usual
    code, out, _ = run(capsys, "resolve", dst, "--device", "sm90", "--json", "--force", "*.mlp.experts=reference")
    backends = {g["problem"]["kind"]: g["backend"] for g in json.loads(out)["groups"]}
    assert backends == {"moe": "reference", "linear": "triton_nvfp4"}


def test_quantize_errors_are_clear(bf16_dir, tmp_path, capsys):
    code, _, err = run(capsys, "quantize", bf16_dir, tmp_path / "x", "--scheme", "w4a4_nvfp4")
    assert code == 2 and "input" in err and "amax" in err
    assert not (tmp_path / "x").exists()
    code, _, err = run(capsys, "quantize", tmp_path, tmp_path / "y")
    assert code == 2 and "config.json" in err
    code, _, err = run(capsys, "resolve", tmp_path, "--device", "sm90")
    assert code == 2 and str(tmp_path) in err
