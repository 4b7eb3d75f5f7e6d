"""``quantoracle quantize`` and ``quantoracle resolve PATH`` on real checkpoint directories."""

import json
import subprocess
import sys

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


@pytest.fixture(scope="module")
def amax(tmp_path_factory):
    model = demo.FloatModel(CFG, demo.make_model(CFG), torch.device("cpu"))
    model(torch.randn(CFG.tokens, CFG.hidden, generator=torch.Generator().manual_seed(0)))
    return model.amax


@pytest.fixture(scope="module")
def w4a4_dir(bf16_dir, amax, tmp_path_factory):
    dst = tmp_path_factory.mktemp("w4a4") / "ckpt"
    assert main(["quantize", str(bf16_dir), str(dst), "--scheme", "w4a4_nvfp4", "--input-amax", json.dumps(amax)]) == 0
    return dst


def test_input_amax_inline_or_file_and_bad_json_is_a_clean_error(bf16_dir, amax, w4a4_dir, tmp_path, capsys):
    path = tmp_path / "amax.json"
    path.write_text(json.dumps(amax))
    code, out, _ = run(capsys, "quantize", bf16_dir, tmp_path / "from-file", "--scheme", "w4a4_nvfp4", "--input-amax", path)
    assert code == 0 and "quantized" in out
    inline, from_file = (d / "model.safetensors" for d in (w4a4_dir, tmp_path / "from-file"))
    assert inline.read_bytes() == from_file.read_bytes()
    for bad, words in (("{not json", "not valid JSON"), ("[1, 2]", "not an object"), (tmp_path / "missing.json", "no such file")):
        code, out, err = run(capsys, "quantize", bf16_dir, tmp_path / "x", "--scheme", "w4a4_nvfp4", "--input-amax", bad)
        assert code == 2 and words in err and "--input-amax" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_quantize_into_a_destination_that_cannot_be_written(bf16_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run(capsys, "quantize", bf16_dir, blocker / "ckpt")
    assert code == 2 and str(blocker) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_during_quantize_is_one_line_and_exit_130(bf16_dir, tmp_path):
    dst = tmp_path / "interrupted"
    script = (  # a real SIGINT, delivered while the first weight is being quantized
        "import os, signal, sys\n"
        "from quantoracle.schemes import nvfp4\n"
        "real = nvfp4.quantize_weight\n"
        "def interrupted(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(*args, **kwargs)\n"
        "nvfp4.quantize_weight = interrupted\n"
        "from quantoracle.cli import main\n"
        f"sys.exit(main(['quantize', {str(bf16_dir)!r}, {str(dst)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "quantoracle quantize: interrupted"
    assert not dst.exists()


def test_checkpoint_path_errors_are_one_line_each(tmp_path, capsys):
    file = tmp_path / "model.safetensors"
    file.write_text("")
    for path in (tmp_path / "missing", "nvidia/Qwen3-30B-A3B-NVFP4", file):
        code, out, err = run(capsys, "resolve", path, "--device", "sm90")
        assert code == 2 and out == "" and str(path) in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err


def test_top_k_above_the_experts_is_an_error(w4a4_dir, capsys):
    code, out, err = run(capsys, "resolve", w4a4_dir, "--device", "sm90", "--top-k", "999")
    assert code == 2 and out == "" and "999" in err and f"{CFG.experts} experts" in err
    code, out, _ = run(capsys, "resolve", w4a4_dir, "--device", "sm90", "--top-k", "3", "--json")
    assert code == 0 and {g["problem"]["top_k"] for g in json.loads(out)["groups"] if g["kind"] == "moe"} == {3}


def test_force_must_name_a_layer_and_a_backend(w4a4_dir, capsys):
    code, _, err = run(capsys, "resolve", w4a4_dir, "--device", "sm90", "--force", "*.mlp.expert=reference")
    assert code == 2 and "*.mlp.expert=reference" in err and "matches no quantized layer" in err
    code, _, err = run(capsys, "resolve", w4a4_dir, "--device", "sm90", "--force", "*.mlp.experts=refrence")
    assert code == 2 and "refrence" in err and "reference" in err
    code, _, err = run(capsys, "resolve", w4a4_dir, "--device", "sm90", "--force", "*.o_proj=reference",
                       "--force", "*.mlp.experts")
    assert code == 2 and "GLOB=BACKEND" in err


def test_the_environment_force_is_named_in_the_header(w4a4_dir, capsys, monkeypatch):
    monkeypatch.setenv("QUANTORACLE_BACKEND", "reference")
    code, out, _ = run(capsys, "resolve", w4a4_dir, "--device", "sm90")
    assert code == 0 and "force=reference (from $QUANTORACLE_BACKEND)" in out
    code, out, _ = run(capsys, "resolve", w4a4_dir, "--device", "sm90", "--json")
    data = json.loads(out)
    assert data["env_force"] == "reference" and {g["backend"] for g in data["groups"]} == {"reference"}
    monkeypatch.setenv("QUANTORACLE_BACKEND", "refrence")
    code, _, err = run(capsys, "resolve", w4a4_dir, "--device", "sm90")
    assert code == 2 and "$QUANTORACLE_BACKEND=refrence" in err


def test_json_is_enough_for_a_script(w4a4_dir, capsys):
    code, out, _ = run(capsys, "resolve", w4a4_dir, "--device", "sm90", "--json", "--exclude", "reference")
    data = json.loads(out)
    assert code == 0 and data["quantoracle"][0].isdigit() and data["format"] == "modelopt"
    assert (data["device"], data["device_source"], data["dtype"]) == ("sm90", "--device sm90", "bfloat16")
    assert (data["activation_fallback"], data["override_activation"], data["force"], data["exclude"]) == (
        "weight_only", None, None, ["reference"])
    for group in data["groups"]:
        assert (group["checkpoint_scheme"], group["served_scheme"], group["fallback"]) == (
            "w4a4_nvfp4", "w4a16_nvfp4", "weight_only")
    layers = sorted(name for g in data["groups"] for name in g["layers"])
    assert layers == sorted([f"model.layers.{i}.{m}" for i in range(CFG.layers) for m in ("mlp.experts", "self_attn.o_proj")])

    code, out, _ = run(capsys, "resolve", w4a4_dir, "--device", "sm90", "--json", "--activation-fallback", "error")
    data = json.loads(out)
    assert code == 1 and all(g["backend"] is None and g["served_scheme"] is None for g in data["groups"])
    failure = data["groups"][0]["rejections"]["reference"][0]
    assert set(failure) == {"code", "found", "accepted", "message"} and failure["code"] == "activation_scheme"
    assert data["groups"][0]["error"]["type"] == "NoBackendError"


def test_layers_lists_every_layer_and_hints_are_flags(w4a4_dir, capsys):
    code, out, _ = run(capsys, "resolve", w4a4_dir, "--device", "sm90", "--layers", "--activation-fallback", "error")
    assert code == 1
    for i in range(CFG.layers):
        assert f"\n  model.layers.{i}.mlp.experts\n" in out
    hints = [line for line in out.splitlines() if line.startswith("hint: ")]
    assert hints and all("--activation-fallback weight_only" in h and "activation_fallback=" not in h for h in hints)
    # the flag already given is not suggested again
    code, out, _ = run(capsys, "resolve", w4a4_dir, "--device", "sm90", "--activation-fallback", "emulate",
                       "--exclude", "reference", "--exclude", "triton_nvfp4")
    hints = [line for line in out.splitlines() if line.startswith("hint: ")]
    assert code == 1 and hints and all("--activation-fallback" not in h and "--exclude" in h for h in hints)
