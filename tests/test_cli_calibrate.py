"""``quantoracle calibrate``: a 16-bit model directory -> the --input-amax file of a W4A4 quantize."""

import json

import pytest
from transformers_helpers import example

from quantoracle.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("calibrate") / "bf16"
    example.build_model(example.model_config("qwen3_moe", "tiny")).save_pretrained(directory)
    return directory


def test_calibrate_then_quantize_w4a4_then_resolve(model_dir, tmp_path, capsys):
    amax = tmp_path / "amax.json"
    assert main(["calibrate", str(model_dir), "--random-tokens", "48", "--out", str(amax), "--quiet"]) == 0
    values = json.loads(amax.read_text())
    # per expert and projection, under the checkpoint's names, and every attention projection
    assert "model.layers.0.mlp.experts.3.down_proj" in values and "model.layers.1.self_attn.q_proj" in values
    assert all(isinstance(v, float) and v > 0 for v in values.values())
    assert "--input-amax" in capsys.readouterr().out
    out = tmp_path / "w4a4"
    assert main(["quantize", str(model_dir), str(out), "--scheme", "w4a4_nvfp4", "--input-amax", str(amax), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["resolve", str(out), "--device", "cpu", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert {g["checkpoint_scheme"] for g in groups} == {"w4a4_nvfp4"}


def test_calibrate_from_given_token_ids_and_bad_input(model_dir, tmp_path, capsys):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[1, 2, 3, 4], [5, 6, 7]]))
    assert main(["calibrate", str(model_dir), "--input-ids", str(ids), "--out", str(tmp_path / "a.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 7
    ids.write_text(json.dumps([10**9]))
    assert main(["calibrate", str(model_dir), "--input-ids", str(ids), "--out", str(tmp_path / "b.json")]) == 2
    assert "token ids in 0.." in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path), "--random-tokens", "4", "--out", str(tmp_path / "c.json")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "c.json").exists()
