import json

from quantoracle.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_backends_table_and_json(capsys):
    code, out, _ = run(capsys, "backends")
    assert code == 0 and "triton_nvfp4" in out and "reference" in out
    code, out, _ = run(capsys, "backends", "--json")
    specs = {s["name"]: s for s in json.loads(out)["backends"]}
    assert specs["triton_nvfp4"]["capabilities"] == [{"low": [8, 0], "high": None}]
    assert [s["name"] for s in specs["reference"]["schemes"]] == ["w4a16_nvfp4", "w4a4_nvfp4"]
    assert specs["reference"]["provided_by"]["distribution"] == "quantoracle"


def test_matrix_on_hopper_serves_both_nvfp4_schemes_weight_only(capsys):
    code, out, _ = run(capsys, "matrix", "--device", "sm90", "--json")
    rows = {(r["scheme"], r["kind"]): r for r in json.loads(out)["rows"]}
    assert rows["w4a16_nvfp4", "moe"]["backend"] == "triton_nvfp4"
    assert rows["w4a4_nvfp4", "moe"]["fallback"] == "weight_only"
    assert rows["w8a8_fp8", "linear"]["backend"] is None
    assert rows["w8a8_fp8", "linear"]["asked_rejections"]["reference"] == ["weight_scheme"]
    # the as-asked reasons of a fallback row: why W4A4 is not served natively
    assert "activation_scheme" in rows["w4a4_nvfp4", "moe"]["asked_rejections"]["reference"]
    assert rows["w4a4_nvfp4", "moe"]["served_scheme"] == "w4a16_nvfp4"
    code, out, _ = run(capsys, "matrix", "--device", "cpu", "--dtype", "float32")
    assert "w4a16_nvfp4       moe     reference" in out


def test_bad_device_is_a_clear_error(capsys):
    code, _, err = run(capsys, "matrix", "--device", "hopper")
    assert code == 2 and "sm90" in err


def test_bench_writes_json(capsys, tmp_path):
    code, out, _ = run(capsys, "bench", "--rounds", "1", "--out", str(tmp_path))
    data = json.loads((tmp_path / "resolve.json").read_text())
    assert code == 0 and data["problems"] > 100 and data["cached_us_median"] > 0


def test_backends_lists_each_variant_with_what_it_overrides(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "triton_nvfp4/dequantize (linear; w4a16_nvfp4 only; priority 9):" in out
    assert "triton_nvfp4/unsorted (moe; priority 9):" in out


def test_a_variant_for_one_architecture_shows_its_devices_and_shape():
    from quantoracle.cli.backends import _variant
    from quantoracle.oracle import Variant
    from quantoracle.oracle.registry import default_registry

    spec = default_registry().backends["triton_nvfp4"].spec
    text = _variant(spec, Variant(name="wgmma", layer_kinds={"linear"}, capabilities="sm90", n_multiple_of=2,
                                  description="Gluon"))
    assert text == "wgmma (linear; capability sm90; n%2 k%16): Gluon"
