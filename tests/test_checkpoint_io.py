"""Writing and reading NVFP4 checkpoints: round trips, sharded loading, and malformed files."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import quantoracle
from quantoracle.errors import (
    CheckpointFormatError,
    NumericsError,
    ProblemError,
    SchemeError,
)
from quantoracle.schemes import nvfp4
from quantoracle.schemes.checkpoint import (
    Checkpoint,
    SafetensorsDirectory,
    quantize_checkpoint,
    quantize_state_dict,
    write_checkpoint,
)
from quantoracle.schemes.scheme import W4A4_NVFP4, W4A16_NVFP4

H, I, E, V = 32, 32, 4, 48  # hidden, intermediate, experts, vocab
LAYER = "model.layers.0"
EXPERTS = f"{LAYER}.mlp.experts"
QKV = [f"{LAYER}.self_attn.{p}_proj" for p in "qkv"]
FORMATS = ["modelopt", "compressed-tensors"]
SCHEMES = [W4A16_NVFP4, W4A4_NVFP4]


def bf16(*shape: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: dtype, shape and bytes."""
    flat = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(flat(a), flat(b))


def tiny_moe(prefix: str = EXPERTS) -> dict[str, torch.Tensor]:
    """A one-layer Qwen3-MoE-like state dict with transformers-5 fused experts."""
    return {
        "model.embed_tokens.weight": bf16(V, H, seed=1),
        f"{LAYER}.input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        QKV[0] + ".weight": bf16(32, H, seed=2),
        QKV[1] + ".weight": bf16(16, H, seed=3, scale=0.2),  # k has the group's amax
        QKV[2] + ".weight": bf16(16, H, seed=4),
        f"{LAYER}.self_attn.o_proj.weight": bf16(H, 32, seed=5),
        f"{prefix.rsplit('.', 1)[0]}.gate.weight": bf16(E, H, seed=6),
        f"{prefix}.gate_up_proj": bf16(E, 2 * I, H, seed=7),
        f"{prefix}.down_proj": bf16(E, H, I, seed=8),
        "lm_head.weight": bf16(V, H, seed=9),
    }


def per_expert(
    tensors: dict[str, torch.Tensor], names=("gate_proj", "up_proj", "down_proj")
) -> dict[str, torch.Tensor]:
    """The same model with experts stored one module per expert and projection."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(".experts.gate_up_proj"):
            prefix = name.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.{names[0]}.weight"], out[f"{prefix}.{e}.{names[1]}.weight"] = t[
                    e
                ].chunk(2)
        elif name.endswith(".experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.{names[2]}.weight"] = t[e]
        else:
            out[name] = t
    return out


def quantized_modules(prefix: str = EXPERTS) -> list[str]:
    experts = [f"{prefix}.{e}.{p}" for e in range(E) for p in ("gate_proj", "up_proj", "down_proj")]
    return [*QKV, f"{LAYER}.self_attn.o_proj", *experts]


def amax_of(modules, base: float = 3.0) -> dict[str, float]:
    return {m: base + i / 7 for i, m in enumerate(modules)}


def write(tmp_path: Path, fmt: str, scheme, tensors=None, **kw) -> Path:
    tensors = tensors if tensors is not None else tiny_moe()
    input_amax = None if scheme.weight_only else amax_of(quantized_modules())
    return write_checkpoint(
        tmp_path / f"{fmt}-{scheme.name}",
        tensors,
        scheme,
        fmt,
        input_amax=input_amax,
        progress=False,
        **kw,
    ).directory


# ---- round trips ----


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_write_read_dequantize_equals_quantize_dequantize(tmp_path, fmt, scheme):
    tensors = tiny_moe()
    directory = write(tmp_path, fmt, scheme, tensors)
    with Checkpoint.open(directory) as checkpoint:
        entries = {e.name: e for e in checkpoint.layers()}
        assert sorted(entries) == sorted([EXPERTS, *QKV, f"{LAYER}.self_attn.o_proj"])
        moe_entry = entries[EXPERTS]
        assert (moe_entry.experts, moe_entry.hidden, moe_entry.intermediate) == (E, H, I)
        assert {e.scheme for e in entries.values()} == {scheme}

        # q/k/v share one scale_2 from the group's max amax (k's); the reader gives back exactly
        # the scale the bytes were quantized with (compressed-tensors: 1/x of the stored 1/x).
        group_scale = nvfp4.global_scale(
            max(tensors[m + ".weight"].float().abs().amax() for m in QKV)
        )
        stored = group_scale if fmt == "modelopt" else 1.0 / group_scale
        for module in QKV:
            read = checkpoint.linear(module)
            served = stored if fmt == "modelopt" else 1.0 / stored
            assert read.global_scale.item() == served.item()
            packed, block_scale, scale_2 = nvfp4.quantize_weight(
                tensors[module + ".weight"], read.global_scale[0]
            )
            assert torch.equal(read.packed, packed)
            assert torch.equal(read.block_scale.view(torch.uint8), block_scale.view(torch.uint8))
            assert torch.equal(read.dequantize(), nvfp4.dequantize(packed, block_scale, scale_2))
            assert (read.input_scale is None) == scheme.weight_only

        moe = checkpoint.moe(EXPERTS)
        gate_up, down = tensors[f"{EXPERTS}.gate_up_proj"], tensors[f"{EXPERTS}.down_proj"]
        for e in range(E):
            expected = []
            for rows, g in zip(gate_up[e].chunk(2), moe.gate_up.global_scale[e]):
                expected.append(nvfp4.dequantize(*nvfp4.quantize_weight(rows, g)))
            assert torch.equal(moe.gate_up.dequantize()[e], torch.cat(expected))
            d = nvfp4.dequantize(*nvfp4.quantize_weight(down[e], moe.down.global_scale[e, 0]))
            assert torch.equal(moe.down.dequantize()[e], d)
        if not scheme.weight_only:
            # input_scale = amax / 2688 of gate/up's group max, stored in the format's convention
            amax = amax_of(quantized_modules())
            gate, up = f"{EXPERTS}.1.gate_proj", f"{EXPERTS}.1.up_proj"
            expected = nvfp4.global_scale(max(amax[gate], amax[up]))
            if fmt == "compressed-tensors":
                expected = 1.0 / (1.0 / expected)
            assert moe.gate_up.input_scale[1].tolist() == [expected.item()] * 2


@settings(max_examples=20, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    scheme=st.sampled_from(SCHEMES),
    rows=st.integers(1, 3),
    blocks=st.integers(1, 3),
    log_scale=st.floats(-20, 20),
    input_amax=st.floats(0, 1e4),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(fmt, scheme, rows, blocks, log_scale, input_amax, seed):
    name = f"{LAYER}.mlp.down_proj"
    w = bf16(8 * rows, 16 * blocks, seed=seed, scale=2.0**log_scale)
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_checkpoint(
            Path(tmp) / "c",
            {name + ".weight": w},
            scheme,
            fmt,
            input_amax={name: input_amax},
            progress=False,
        )
        with Checkpoint.open(directory) as checkpoint:
            read = checkpoint.linear(name)
    scale_2 = nvfp4.global_scale(w.float().abs().amax())
    input_scale = nvfp4.global_scale(input_amax)
    if fmt == "compressed-tensors":  # stored as 1/x, read through 1/x
        scale_2, input_scale = 1.0 / (1.0 / scale_2), 1.0 / (1.0 / input_scale)
    assert read.global_scale.tolist() == [scale_2.item()]
    if scheme.weight_only:
        assert read.input_scale is None
    else:
        assert read.input_scale.tolist() == [input_scale.item()]
    packed, block_scale, _ = nvfp4.quantize_weight(w, scale_2)
    assert same(read.packed, packed) and same(read.block_scale, block_scale)
    assert torch.equal(read.dequantize(), nvfp4.dequantize(packed, block_scale, scale_2))


def dtypes_and_shapes(files: dict[str, torch.Tensor], module: str) -> dict[str, tuple]:
    prefix = module + "."
    return {
        n[len(prefix) :]: (t.dtype, tuple(t.shape))
        for n, t in files.items()
        if n.startswith(prefix)
    }


def test_modelopt_files_hold_modelopt_names_dtypes_and_shapes(tmp_path):
    directory = write(tmp_path, "modelopt", W4A4_NVFP4)
    files = load_file(directory / "model.safetensors")
    assert dtypes_and_shapes(files, QKV[0]) == {
        "weight": (torch.uint8, (32, H // 2)),
        "weight_scale": (torch.float8_e4m3fn, (32, H // 16)),
        "weight_scale_2": (torch.float32, ()),
        "input_scale": (torch.float32, ()),
    }
    assert files["lm_head.weight"].dtype == torch.bfloat16
    assert f"{EXPERTS}.0.gate_proj.weight" in files and f"{EXPERTS}.gate_up_proj" not in files
    config = json.loads((directory / "hf_quant_config.json").read_text())["quantization"]
    assert config["exclude_modules"] == ["lm_head", "model.embed_tokens", f"{LAYER}.mlp.gate"]


def test_compressed_tensors_files_hold_reciprocal_globals(tmp_path):
    directory = write(tmp_path, "compressed-tensors", W4A4_NVFP4)
    files = load_file(directory / "model.safetensors")
    assert dtypes_and_shapes(files, QKV[0]) == {
        "weight_packed": (torch.uint8, (32, H // 2)),
        "weight_scale": (torch.float8_e4m3fn, (32, H // 16)),
        "weight_global_scale": (torch.float32, (1,)),
        "input_global_scale": (torch.float32, (1,)),
    }
    assert files[QKV[0] + ".weight_global_scale"].item() > 1  # 1/scale_2
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized"
    assert config["config_groups"]["group_0"]["input_activations"]["strategy"] == "tensor_group"


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_and_per_expert_sources_give_the_same_checkpoint(fmt):
    fused = quantize_state_dict(tiny_moe(), W4A16_NVFP4, fmt)
    split = quantize_state_dict(per_expert(tiny_moe()), W4A16_NVFP4, fmt)
    assert fused.keys() == split.keys()
    for name in fused:
        assert same(fused[name], split[name]), name


def test_mixtral_keeps_its_saved_names(tmp_path):
    # transformers 5 holds Mixtral's block_sparse_moe as `mlp` in memory; the checkpoint gets the
    # saved names, with w1/w3/w2 experts in ModelOpt and gate/up/down_proj in compressed-tensors.
    mixtral = {"model_type": "mixtral"}
    prefix = f"{LAYER}.block_sparse_moe.experts"
    out = quantize_state_dict(tiny_moe(), W4A16_NVFP4, "modelopt", config=mixtral)
    assert f"{prefix}.2.w1.weight" in out and f"{prefix}.2.w2.weight_scale" in out
    assert out[f"{LAYER}.block_sparse_moe.gate.weight"].dtype == torch.bfloat16  # the router
    assert not [n for n in out if ".mlp." in n]
    ct = quantize_state_dict(tiny_moe(), W4A16_NVFP4, "compressed-tensors", config=mixtral)
    assert f"{prefix}.2.gate_proj.weight_packed" in ct
    # the on-disk per-expert w1/w3/w2 model gives the same checkpoint; w1 and w3 share a scale
    saved = {n.replace(".mlp.", ".block_sparse_moe."): t for n, t in tiny_moe().items()}
    from_disk = quantize_state_dict(per_expert(saved, ("w1", "w3", "w2")), W4A16_NVFP4, "modelopt")
    assert from_disk.keys() == out.keys() and all(same(out[n], from_disk[n]) for n in out)
    directory = write_checkpoint(
        tmp_path / "mixtral", tiny_moe(), W4A16_NVFP4, config=mixtral, progress=False
    )
    with Checkpoint.open(directory) as checkpoint:
        assert checkpoint.moe(prefix).experts == E


def test_differing_gate_and_up_scales_are_kept_not_requantized(tmp_path):
    gate_w, up_w, down_w = bf16(I, H, seed=1), bf16(I, H, seed=2, scale=1.0), bf16(H, I, seed=3)
    tensors = {}
    for e in range(2):
        for name, w in (("gate_proj", gate_w), ("up_proj", up_w), ("down_proj", down_w)):
            packed, block_scale, scale_2 = nvfp4.quantize_weight(w)  # each its own scale_2
            m = f"{EXPERTS}.{e}.{name}"
            tensors |= {
                f"{m}.weight": packed,
                f"{m}.weight_scale": block_scale,
                f"{m}.weight_scale_2": scale_2,
            }
    tmp_path.joinpath("hf_quant_config.json").write_text(
        json.dumps(
            {"quantization": {"quant_algo": "W4A16_NVFP4", "group_size": 16, "exclude_modules": []}}
        )
    )
    save_file(tensors, tmp_path / "model.safetensors")
    with Checkpoint.open(tmp_path) as checkpoint:
        moe = checkpoint.moe(EXPERTS)
    assert moe.gate_up.global_scale[0].tolist() == [
        tensors[f"{EXPERTS}.0.gate_proj.weight_scale_2"].item(),
        tensors[f"{EXPERTS}.0.up_proj.weight_scale_2"].item(),
    ]
    expected = torch.cat([nvfp4.dequantize(*nvfp4.quantize_weight(w)) for w in (gate_w, up_w)])
    assert torch.equal(moe.gate_up.dequantize()[1], expected)


def test_override_activation_serves_w4a4_weight_only(tmp_path):
    directory = write(tmp_path, "modelopt", W4A4_NVFP4)
    with quantoracle.load_checkpoint(directory, override_activation="none") as checkpoint:
        assert {e.scheme for e in checkpoint.layers()} == {W4A16_NVFP4}
        assert checkpoint.linear(QKV[0]).input_scale is None
        assert checkpoint.moe(EXPERTS).gate_up.input_scale is None


# ---- sharded files and sharded loading ----


def test_shards_and_index(tmp_path):
    directory = write(tmp_path, "modelopt", W4A16_NVFP4, max_shard_bytes=4096)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in directory.glob("*.safetensors")) == files
    single = write(tmp_path / "single", "modelopt", W4A16_NVFP4)
    with Checkpoint.open(directory) as sharded, Checkpoint.open(single) as whole:
        for a, b in zip(sharded.layers(), whole.layers()):
            assert a == b
        assert torch.equal(sharded.moe(EXPERTS).down.packed, whole.moe(EXPERTS).down.packed)


class ReadSpy:
    """Records what SafetensorsDirectory.read is asked for."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, tuple]] = []
        original = SafetensorsDirectory.read

        def read(files, name, index=()):
            self.calls.append((name, index))
            return original(files, name, index)

        monkeypatch.setattr(SafetensorsDirectory, "read", read)


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_shards_are_slices_read_from_disk(tmp_path, monkeypatch, fmt):
    directory = write(tmp_path, fmt, W4A4_NVFP4)
    with Checkpoint.open(directory) as checkpoint:
        q = QKV[0]
        full = checkpoint.linear(q)
        spy = ReadSpy(monkeypatch)
        rows = checkpoint.linear(q, shard=("rows", 1, 4))
        cols = checkpoint.linear(q, shard=("cols", 1, 2))
    assert torch.equal(rows.packed, full.packed[8:16]) and torch.equal(
        rows.dequantize(), full.dequantize()[8:16]
    )
    assert torch.equal(cols.dequantize(), full.dequantize()[:, 16:32])
    assert torch.equal(rows.input_scale, full.input_scale)
    packed_reads = [
        index for name, index in spy.calls if name.endswith((".weight", ".weight_packed"))
    ]
    assert packed_reads == [(slice(8, 16), slice(0, 16)), (slice(0, 32), slice(8, 16))]


def test_moe_expert_and_tensor_parallel_slices(tmp_path, monkeypatch):
    directory = write(tmp_path, "compressed-tensors", W4A4_NVFP4)
    with Checkpoint.open(directory) as checkpoint:
        full = checkpoint.moe(EXPERTS)
        spy = ReadSpy(monkeypatch)
        part = checkpoint.moe(EXPERTS, experts=range(1, 3), tp=(1, 2))
    assert part.first_expert == 1 and part.experts == 2 and part.intermediate == I // 2
    gate_up = full.gate_up.dequantize()[1:3]
    assert torch.equal(
        part.gate_up.dequantize(), torch.cat([gate_up[:, 16:32], gate_up[:, 48:64]], dim=1)
    )
    assert torch.equal(part.down.dequantize(), full.down.dequantize()[1:3, :, 16:32])
    assert torch.equal(part.gate_up.input_scale, full.gate_up.input_scale[1:3])
    read_experts = {name.split(".")[5] for name, _ in spy.calls}
    assert read_experts == {"1", "2"}  # only the chosen experts' tensors are touched
    assert all(index != () for name, index in spy.calls if "global" not in name)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: c.linear(QKV[0], shard=("cols", 0, 4)), "multiples of 16"),  # K=32 -> 8 columns
        (lambda c: c.linear(QKV[1], shard=("rows", 0, 3)), "equal parts"),
        (lambda c: c.linear(QKV[1], shard=("rows", 2, 2)), "rank 2 of size 2"),
        (lambda c: c.linear(QKV[1], shard=("diagonal", 0, 2)), "rows"),
        (lambda c: c.moe(EXPERTS, tp=(0, 4)), "multiples of 16"),
        (lambda c: c.moe(EXPERTS, experts=range(2, 9)), "range"),
        (lambda c: c.moe(EXPERTS, experts=[0, 1]), "range"),
    ],
)
def test_impossible_shards_raise_problem_error(tmp_path, call, match):
    with (
        Checkpoint.open(write(tmp_path, "modelopt", W4A16_NVFP4)) as checkpoint,
        pytest.raises(ProblemError, match=match),
    ):
        call(checkpoint)


# ---- whole-directory quantization and atomic writes ----


def test_quantize_checkpoint_from_a_bf16_directory(tmp_path):
    src = tmp_path / "bf16"
    src.mkdir()
    tensors = per_expert(tiny_moe())
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, src / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[5:]}, src / "model-00002-of-00002.safetensors")
    (src / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    n: f"model-0000{1 if i < 5 else 2}-of-00002.safetensors"
                    for i, n in enumerate(names)
                }
            }
        )
    )
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": H}))
    (src / "tokenizer.json").write_text("{}")
    dst = quantize_checkpoint(
        src, tmp_path / "nvfp4", W4A16_NVFP4, format="compressed-tensors", progress=False
    )
    config = json.loads((dst / "config.json").read_text())
    assert config["hidden_size"] == H
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (dst / "tokenizer.json").exists()
    expected = quantize_state_dict(tensors, W4A16_NVFP4, "compressed-tensors")
    written = load_file(dst / "model.safetensors")
    assert written.keys() == expected.keys()
    assert all(same(written[n], expected[n]) for n in written)
    with pytest.raises(CheckpointFormatError, match="already quantized"):
        quantize_checkpoint(dst, tmp_path / "again", W4A16_NVFP4, progress=False)


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    tensors = tiny_moe()
    tensors[f"{LAYER}.self_attn.o_proj.weight"][3, 5] = float("nan")
    with pytest.raises(NumericsError, match="o_proj"):
        write_checkpoint(tmp_path / "out", tensors, W4A16_NVFP4, progress=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        write_checkpoint(tmp_path / "taken", tiny_moe(), W4A16_NVFP4, progress=False)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda t: t, SchemeError, "input amax"),  # W4A4 without calibration
        (
            lambda t: t | {f"{LAYER}.mlp.down_proj.weight": bf16(H, 24, seed=1)},
            NumericsError,
            "multiple of 16",
        ),
    ],
)
def test_writer_refuses_what_it_cannot_write(tmp_path, change, error, match):
    scheme = W4A4_NVFP4 if error is SchemeError else W4A16_NVFP4
    with pytest.raises(error, match=match):
        quantize_state_dict(change(tiny_moe()), scheme)


def test_writer_refuses_excludes_that_split_a_fused_group():
    with pytest.raises(SchemeError, match="one layer"):
        quantize_state_dict(tiny_moe(), W4A16_NVFP4, exclude=("*.k_proj",))
    with pytest.raises(SchemeError, match="one layer"):
        quantize_state_dict(per_expert(tiny_moe()), W4A16_NVFP4, exclude=(f"{EXPERTS}.1.*",))
    with pytest.raises(SchemeError, match="w4a16_nvfp4 or w4a4_nvfp4"):
        quantize_state_dict(tiny_moe(), "w8a8_fp8")
    out = quantize_state_dict(tiny_moe(), W4A16_NVFP4, exclude=("*.self_attn.*", f"{EXPERTS}"))
    assert out[f"{EXPERTS}.gate_up_proj"].dtype == torch.bfloat16
    assert QKV[0] + ".weight_scale" not in out


# ---- malformed checkpoints ----


def broken(tmp_path: Path, edit) -> Path:
    """A valid W4A4 ModelOpt checkpoint whose tensors ``edit`` changed in place."""
    directory = write(tmp_path, "modelopt", W4A4_NVFP4)
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")
    return directory


Q = QKV[0]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.pop(Q + ".weight_scale_2"), "weight_scale_2 is missing"),
        (lambda t: t.pop(Q + ".input_scale"), "input_scale is missing"),
        (
            lambda t: t.update({Q + ".weight_scale": t[Q + ".weight_scale"][:, :1].contiguous()}),
            r"expected shape \[32, 2\]",
        ),
        (lambda t: t.update({Q + ".weight": t[Q + ".weight"].view(torch.int8)}), "expected U8"),
        (lambda t: t.update({Q + ".weight_scale_2": torch.ones(2)}), "one value"),
        (lambda t: t.update({Q + ".pre_quant_scale": torch.ones(H)}), "pre_quant_scale"),
        (
            lambda t: t.update({f"{LAYER}.mlp.gate.weight_scale": torch.ones(1)}),
            "says it is not quantized",
        ),
        (
            lambda t: [t.pop(k) for k in list(t) if k.startswith(f"{EXPERTS}.3.")],
            None,
        ),  # fine: 3 experts
        (
            lambda t: [t.pop(k) for k in list(t) if k.startswith(f"{EXPERTS}.1.")],
            r"expected 0\.\.2",
        ),
        (
            lambda t: [t.pop(k) for k in list(t) if k.startswith(f"{EXPERTS}.2.down_proj")],
            "gate, up and down",
        ),
        (
            lambda t: t.update(
                {
                    k.replace("gate_proj", "w1"): v.clone()
                    for k, v in t.items()
                    if k.startswith(f"{EXPERTS}.2.gate_proj")
                }
            ),
            "both the gate",
        ),
    ],
)
def test_inconsistent_tensors_raise_checkpoint_format_error(tmp_path, edit, match):
    directory = broken(tmp_path, edit)
    with Checkpoint.open(directory) as checkpoint:
        if match is None:
            assert checkpoint.moe(EXPERTS).experts == E - 1
            return
        with pytest.raises(CheckpointFormatError, match=match):
            checkpoint.layers()


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda t: t.update({Q + ".weight_scale_2": torch.tensor(float("nan"))}),
            "positive normal",
        ),
        (lambda t: t.update({Q + ".input_scale": torch.tensor(0.0)}), "positive normal"),
        (lambda t: t[Q + ".weight_scale"].view(torch.uint8)[0, 0].fill_(0x7F), "NaN block scales"),
    ],
)
def test_bad_scale_values_raise_when_read(tmp_path, edit, match):
    with Checkpoint.open(broken(tmp_path, edit)) as checkpoint:
        assert Q in {e.name for e in checkpoint.layers()}
        with pytest.raises(CheckpointFormatError, match=match):
            checkpoint.linear(Q)


def test_broken_files_and_unknown_layers(tmp_path):
    directory = write(tmp_path, "modelopt", W4A16_NVFP4, max_shard_bytes=4096)
    with Checkpoint.open(directory) as checkpoint:
        with pytest.raises(
            CheckpointFormatError, match="no quantized linear layer named 'lm_head'"
        ):
            checkpoint.linear("lm_head")
        with pytest.raises(CheckpointFormatError, match="no quantized moe layer"):
            checkpoint.moe(QKV[0])
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    (directory / index["weight_map"][QKV[0] + ".weight"]).unlink()
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        Checkpoint.open(directory).layers()
    (directory / "model.safetensors.index.json").write_text("[1, 2")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        Checkpoint.open(directory)
    (directory / "model.safetensors.index.json").unlink()
    next(directory.glob("*.safetensors")).write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"
    )
    with pytest.raises(CheckpointFormatError, match="not a readable safetensors"):
        Checkpoint.open(directory)
