"""``quantoracle env`` and ``quantoracle verify CKPT`` (issue 14)."""

import json

import pytest
import torch
from test_trust import EXACT, WRONG, registry_with, tuning_cache

from quantoracle import demo
from quantoracle.cli import build_parser, main
from quantoracle.cli import verify as verify_command
from quantoracle.oracle.fingerprint import Fingerprint
from quantoracle.oracle.quarantine import ENV_QUARANTINE, SHIPPED, clear_runtime_entries, load_entries
from quantoracle.schemes.checkpoint import write_checkpoint

CFG = demo.ToyConfig(layers=2, experts=8, hidden=64, intermediate=32, top_k=2, tokens=8)


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for name in (ENV_QUARANTINE, "QUANTORACLE_VERIFY", "QUANTORACLE_BACKEND", "QUANTORACLE_TUNING"):
        monkeypatch.delenv(name, raising=False)
    clear_runtime_entries()
    yield
    clear_runtime_entries()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# env


def test_env_prints_the_fingerprint_plugins_quarantine_and_tuning(capsys):
    code, out, _ = run(capsys, "env", "--device", "cpu")
    assert code == 0
    assert f"torch {torch.__version__}" in out and "device      cpu (--device cpu)" in out
    entries = load_entries(SHIPPED)
    assert "reference (quantoracle" in out and f"quarantine  {len(entries)} entries in force from shipped" in out
    for entry in entries:
        assert f"  {entry.describe()}: {entry.reason} ({entry.link}) [shipped quarantine]" in out


def test_env_json_is_the_fingerprint_every_answer_carries(capsys):
    from quantoracle.oracle import Device, Problem, resolve
    from quantoracle.schemes import W4A16_NVFP4

    code, out, _ = run(capsys, "env", "--device", "sm90", "--json")
    data = json.loads(out)
    res = resolve(Problem(kind="linear", scheme=W4A16_NVFP4, device=Device.parse("sm90"), n=4096, k=4096))
    fingerprint = {k: v for k, v in data["fingerprint"].items() if k != "digest"}
    assert code == 0 and Fingerprint.model_validate(fingerprint) == res.fingerprint
    assert data["fingerprint"]["digest"] == res.fingerprint.digest
    assert dict(map(tuple, data["fingerprint"]["packages"]))["quantoracle"]
    assert data["backends"]["reference"]["distribution"] == "quantoracle"
    assert data["quarantine"]["sources"] == ["shipped"] and data["broken_plugins"] == []


def test_env_shows_a_user_quarantine_and_whether_each_tuning_cache_applies(tmp_path, monkeypatch, capsys):
    quarantine = tmp_path / "q.toml"
    quarantine.write_text('[[entry]]\nbackend = "triton_nvfp4"\ncapabilities = ["sm90"]\nreason = "seen wrong"\n')
    monkeypatch.setenv(ENV_QUARANTINE, str(quarantine))
    code, out, _ = run(capsys, "env", "--device", "cpu", "--json")
    data = json.loads(out)
    here = Fingerprint.model_validate({k: v for k, v in data["fingerprint"].items() if k != "digest"})
    assert data["quarantine"]["sources"] == ["shipped", str(quarantine)]
    assert {"source": str(quarantine), "matches": "triton_nvfp4 capabilities=sm90", "reason": "seen wrong",
            "link": None} in data["quarantine"]["entries"]

    same = tuning_cache(tmp_path / "same.json", here, faster="reference")
    other = tuning_cache(tmp_path / "other.json", here.model_copy(update={"triton": "0.0.0"}), faster="reference")
    for cache, applies, why_not in [(same, True, None), (other, False, f"triton 0.0.0 != {here.triton} here")]:
        code, out, _ = run(capsys, "env", "--device", "cpu", "--tuning", cache, "--json")
        (found,) = [c for c in json.loads(out)["tuning_caches"] if c["source"] == str(cache)]
        assert (found["applies"], found["why_not"], found["measurements"]) == (applies, why_not, 4)
    code, out, _ = run(capsys, "env", "--device", "cpu", "--tuning", other)
    assert f"  {other} (match=exact, 4 measurements): not used: triton 0.0.0 != {here.triton} here" in out


def test_env_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"backend": "x"}]')
    code, out, _ = run(capsys, "env", "--quarantine", bad, "--json")
    error = json.loads(out)["error"]
    assert code == 2 and error["type"] == "QuarantineError" and "entry 0: field reason" in error["message"]
    code, _, err = run(capsys, "env", "--device", "tpu")
    assert code == 2 and "--device 'tpu'" in err


# ---------------------------------------------------------------------------------------------
# verify


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A toy W4A16 checkpoint: two o_proj Linears (one group) and two MoE blocks (one group)."""
    path = tmp_path_factory.mktemp("nvfp4")
    write_checkpoint(path, demo.make_model(CFG), "w4a16_nvfp4", progress=False,
                     config={"num_experts_per_tok": CFG.top_k})
    return path


def verify(capsys, checkpoint, registry, *extra):
    args = build_parser().parse_args(["verify", str(checkpoint), "--device", "cpu", "--dtype", "float32", *extra])
    code = verify_command.run(args, registry=registry)
    return code, capsys.readouterr().out


def test_on_cpu_every_layer_is_reference_and_nothing_is_compared(checkpoint, capsys):
    code, out, _ = run(capsys, "verify", checkpoint, "--device", "cpu", "--dtype", "float32")
    assert code == 0
    assert "nothing was compared: every layer resolves to reference on cpu" in out
    assert out.count("not compared: reference serves every batch size") == 2
    code, out, _ = run(capsys, "verify", checkpoint, "--device", "cpu", "--dtype", "float32", "--json")
    data = json.loads(out)
    assert code == 0 and data["compared"] is False and data["failed"] == 0
    assert sorted(g["kind"] for g in data["groups"]) == ["linear", "moe"]
    assert all(g["checks"] == [] and [b["backend"] for b in g["plan"]] == ["reference"] for g in data["groups"])
    assert {len(g["layers"]) for g in data["groups"]} == {CFG.layers}


def test_a_wrong_backend_fails_with_exit_1(checkpoint, capsys):
    code, out = verify(capsys, checkpoint, registry_with({"scaled": WRONG["scaled"]}))
    assert code == 1
    rows = [line.split() for line in out.splitlines() if " scaled " in line]
    assert len(rows) == 6  # 2 groups x probes at 1, 17, 128 tokens
    assert all(row[-1] == "FAILED" and row[-4:-2] == ["5.00e-02", "1e-02"] for row in rows)
    assert "6 checks, 6 failed" in out
    assert verify(capsys, checkpoint, registry_with({"scaled": WRONG["scaled"]}))[0] == 1  # nothing quarantined


def test_a_backend_wrong_from_m4_fails_only_there(checkpoint, capsys):
    code, out = verify(capsys, checkpoint, registry_with({"below4": WRONG["below4"]}), "--json")
    data = json.loads(out)
    assert code == 1 and data["failed"] == 2 and data["compared"] is True
    for group in data["groups"]:
        assert [(c["tokens"], c["passed"]) for c in group["checks"]] == [(1, True), (17, False), (128, False)]
        assert [b["backend"] for b in group["plan"]] == ["below4"]


def test_nan_is_reported_in_json_without_invalid_numbers(checkpoint, capsys):
    code, out = verify(capsys, checkpoint, registry_with({"nan": WRONG["nan"]}), "--json")
    checks = [c for g in json.loads(out)["groups"] for c in g["checks"]]
    assert code == 1 and "Infinity" not in out and "NaN" not in out
    assert {(c["error"], c["finite"], c["passed"]) for c in checks} == {(None, False, False)}


def test_a_correct_backend_passes_with_exit_0(checkpoint, capsys):
    code, out = verify(capsys, checkpoint, registry_with({"exact": EXACT}))
    assert code == 0 and "6 checks, 0 failed" in out and "FAILED" not in out
    assert sum(line.split()[-1] == "ok" for line in out.splitlines() if " exact " in line) == 6


def test_verify_errors(tmp_path, checkpoint, capsys):
    code, _, err = run(capsys, "verify", tmp_path)
    assert code == 2 and str(tmp_path) in err
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "verify", checkpoint, "--device", "cuda")
        assert code == 2 and "needs a CUDA GPU" in err
