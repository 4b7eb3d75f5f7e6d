"""Bad input and interrupted writes around checkpoints (issue 15, items 5, 7, 8, 16, 17): killed
writes, paths that leave the checkpoint directory, stray files beside a model, what quantize
reports, messages for paths that are not checkpoints, and short reprs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantoracle.errors import CheckpointFormatError, SchemeError
from quantoracle.schemes.checkpoint import (
    Checkpoint,
    SafetensorsDirectory,
    load_quant_config,
    quantize_checkpoint,
    write_checkpoint,
)
from quantoracle.schemes.scheme import W4A16_NVFP4
from quantoracle.schemes.tensors import MoEWeights, NVFP4Tensor

H, E = 32, 2
LAYER = "model.layers.0"
ATTENTION = [f"{LAYER}.self_attn.{p}_proj" for p in "qkvo"]
EXPERTS = [f"{LAYER}.mlp.experts.{e}.{p}_proj" for e in range(E) for p in ("gate", "up", "down")]
ROUTER = f"{LAYER}.mlp.gate"


def tiny_model() -> dict[str, torch.Tensor]:
    """A one-layer MoE model with per-expert modules, a router, embeddings and a head."""
    generator = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.05).bfloat16()

    return {
        "model.embed_tokens.weight": weight(48, H),
        f"{LAYER}.input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        **{f"{m}.weight": weight(H, H) for m in ATTENTION},
        f"{ROUTER}.weight": weight(E, H),
        **{f"{m}.weight": weight(H, H) for m in EXPERTS},
        "lm_head.weight": weight(48, H),
    }


def model_directory(path: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A 16-bit transformers model directory: config.json and one model.safetensors."""
    path.mkdir(parents=True)
    save_file(tensors or tiny_model(), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": H}))
    return path


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


# ---- item 5: killed writes ----

# A writer in a child process that stops in the middle of the write (while its partial directory
# exists) until a signal ends it: a Mapping of tensors whose reads then idle in short sleeps
# (signal.pause() could miss a signal that arrives just before it), so nothing is timed.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from quantoracle.schemes.checkpoint import write_checkpoint

    out = Path(sys.argv[1])

    class HeldTensors(dict):
        def __getitem__(self, name):
            if list(out.parent.glob(f".{out.name}.partial-*")):
                print("writing", flush=True)
                while True:
                    time.sleep(0.01)
            return super().__getitem__(name)

    tensors = HeldTensors({"model.layers.0.mlp.up_proj.weight": torch.ones(32, 32).bfloat16()})
    write_checkpoint(out, tensors, "w4a16_nvfp4", progress=False)
    """
)


def killed_writer(out: Path, signum: int) -> int:
    """Run CHILD writing ``out``, send ``signum`` in the middle of its write; its exit status."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline() == "writing\n"
        assert partials(out), "the child holds its partial directory"
        child.send_signal(signum)
        return child.wait(timeout=60)
    finally:
        child.kill()
        child.wait()


def test_sigterm_in_the_middle_of_a_write_removes_the_partial_directory(tmp_path):
    out = tmp_path / "OUT"
    assert killed_writer(out, signal.SIGTERM) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []  # neither OUT nor .OUT.partial-*


def test_a_later_write_removes_the_partial_directory_a_killed_writer_left(tmp_path):
    out = tmp_path / "OUT"
    assert killed_writer(out, signal.SIGKILL) == -signal.SIGKILL
    (left,) = partials(out)
    host = left.name.removeprefix(".OUT.partial-").rsplit("-", 2)[0]
    alive = tmp_path / f".OUT.partial-{host}-{os.getpid()}-0"
    alive.mkdir()  # this process is alive: its partial directory is not provably stale

    summary = write_checkpoint(out, tiny_model(), W4A16_NVFP4, progress=False)

    assert summary.removed_partials == (left,)
    assert not left.exists() and alive.exists()
    assert str(left.name) in summary.describe()
    with Checkpoint.open(out) as checkpoint:
        assert checkpoint.layers()


def test_a_write_leaves_the_sigterm_handler_as_it_found_it(tmp_path):
    def own_handler(signum, frame):
        raise AssertionError("not called")

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    write_checkpoint(tmp_path / "a", tiny_model(), W4A16_NVFP4, progress=False)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    previous = signal.signal(signal.SIGTERM, own_handler)
    try:
        write_checkpoint(tmp_path / "b", tiny_model(), W4A16_NVFP4, progress=False)
        assert signal.getsignal(signal.SIGTERM) is own_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- item 7: paths that leave the directory, conflicting configs ----


def quantized(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt", tiny_model(), W4A16_NVFP4, progress=False).directory


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_an_index_pointing_outside_the_directory_is_refused_unless_allowed(tmp_path, kind):
    directory = quantized(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(directory / "model.safetensors", elsewhere / "x.safetensors")
    entry = {
        "parent": "../elsewhere/x.safetensors",
        "absolute": str(elsewhere / "x.safetensors"),
        "symlink": "linked.safetensors",
    }[kind]
    if kind == "symlink":
        (directory / "linked.safetensors").symlink_to(elsewhere / "x.safetensors")
    names = list(load_file(elsewhere / "x.safetensors"))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(names, entry)})
    )

    with pytest.raises(CheckpointFormatError) as error:
        Checkpoint.open(directory)
    message = str(error.value)
    assert "model.safetensors.index.json" in message and entry in message
    assert "allow_outside_paths=True" in message

    with Checkpoint.open(directory, allow_outside_paths=True) as checkpoint:
        assert len(checkpoint.layers()) == len(ATTENTION) + 1


def test_a_hugging_face_cache_snapshot_links_to_its_blobs(tmp_path):
    written = quantized(tmp_path)
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in written.iterdir():
        os.rename(file, blobs / file.name)
        (snapshot / file.name).symlink_to(Path("../../blobs") / file.name)
    with Checkpoint.open(snapshot) as checkpoint:
        assert len(checkpoint.layers()) == len(ATTENTION) + 1


def test_an_unknown_quant_method_beside_hf_quant_config_names_both_files(tmp_path):
    directory = quantized(tmp_path)
    assert (directory / "hf_quant_config.json").is_file()
    (directory / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "awq", "bits": 4}})
    )
    with pytest.raises(CheckpointFormatError) as error:
        load_quant_config(directory)
    message = str(error.value)
    assert "'awq'" in message and "config.json" in message and "hf_quant_config.json" in message


# ---- item 8: what quantize takes, copies, writes and reports ----


def test_quantize_takes_only_the_models_own_shards_and_known_side_files(tmp_path):
    src = model_directory(tmp_path / "bf16")
    save_file({"logits": torch.ones(4, 48)}, src / "refs.safetensors")
    (src / "tokenizer.json").write_text("{}")
    (src / "MANIFEST.txt").write_text("stray")

    summary = quantize_checkpoint(src, tmp_path / "out", W4A16_NVFP4, progress=False)

    out = summary.directory
    assert "logits" not in load_file(out / "model.safetensors")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "hf_quant_config.json", "model.safetensors", "tokenizer.json"
    ]
    assert summary.ignored_files == ("refs.safetensors",)
    assert summary.copied_files == ("tokenizer.json",)
    assert summary.skipped_files == ("MANIFEST.txt",)
    text = summary.describe()
    assert "refs.safetensors" in text and "MANIFEST.txt" in text


def test_quantize_refuses_a_folder_with_no_model_shards(tmp_path):
    src = tmp_path / "bf16"
    src.mkdir()
    save_file(tiny_model(), src / "weights.safetensors")
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(CheckpointFormatError, match=r"weights\.safetensors"):
        quantize_checkpoint(src, tmp_path / "out", W4A16_NVFP4, progress=False)
    assert not (tmp_path / "out").exists()


def test_written_files_have_the_mode_of_a_normal_file_write(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    src = model_directory(tmp_path / "bf16")
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer.json").chmod(0o600)
    out = quantize_checkpoint(src, tmp_path / "out", W4A16_NVFP4, progress=False).directory
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    assert len(modes) == 4


def test_exclude_adds_to_the_default_exclusions(tmp_path):
    src = model_directory(tmp_path / "bf16")
    summary = quantize_checkpoint(
        src, tmp_path / "out", W4A16_NVFP4, exclude=("model.layers.*.self_attn.*",),
        progress=False,
    )
    kept = {"lm_head", "model.embed_tokens", ROUTER, *ATTENTION}
    assert dict(summary.kept) == {
        "lm_head": "lm_head",
        "model.embed_tokens": "*embed_tokens",
        ROUTER: "*.mlp.gate",
        **dict.fromkeys(ATTENTION, "model.layers.*.self_attn.*"),
    }
    assert set(summary.quantized) == set(EXPERTS)
    assert summary.bytes_after < summary.bytes_before == sum(
        t.numel() * t.element_size() for t in tiny_model().values()
    )
    with Checkpoint.open(summary.directory) as checkpoint:
        assert {e.name for e in checkpoint.layers()} == {f"{LAYER}.mlp.experts"}
        assert all(checkpoint.config.scheme_for(m) is None for m in kept)

    replaced = write_checkpoint(
        tmp_path / "all", tiny_model(), W4A16_NVFP4, exclude=("lm_head",),
        default_exclude=False, progress=False,
    )
    assert dict(replaced.kept) == {"lm_head": "lm_head"}
    assert {"model.embed_tokens", ROUTER} <= set(replaced.quantized)
    with pytest.raises(SchemeError, match=r"\('lm_head',\)"):
        write_checkpoint(tmp_path / "str", tiny_model(), W4A16_NVFP4, exclude="lm_head")


# ---- item 16: paths that are not quantized checkpoints ----


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: "nvidia/Qwen3-30B-A3B-NVFP4", "huggingface-cli download"),
        (lambda tmp: model_directory(tmp / "m") / "model.safetensors", "is a file"),
        (lambda tmp: model_directory(tmp / "m"), "quantoracle quantize"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no config.json"),
    ],
    ids=["missing", "hub id", "file", "16-bit model", "empty directory"],
)
def test_paths_that_are_not_quantized_checkpoints_each_get_their_own_message(
    tmp_path, monkeypatch, make, says
):
    monkeypatch.chdir(tmp_path)
    path = make(tmp_path)
    with pytest.raises(CheckpointFormatError) as error:
        Checkpoint.open(path)
    message = str(error.value)
    assert says in message and str(path) in message
    assert "quantize_checkpoint" not in message


def test_quantize_names_a_missing_source_and_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointFormatError, match="hf download"):
        quantize_checkpoint("Qwen/Qwen3-30B-A3B", tmp_path / "out", W4A16_NVFP4)
    with pytest.raises(CheckpointFormatError, match="no config.json"):
        quantize_checkpoint(tmp_path, tmp_path / "out", W4A16_NVFP4)


# ---- item 17: short reprs ----


def test_reprs_show_shapes_dtypes_scheme_and_device_not_values(tmp_path):
    directory = quantized(tmp_path)
    with Checkpoint.open(directory) as checkpoint:
        linear = checkpoint.linear(ATTENTION[0])
        moe = checkpoint.moe(f"{LAYER}.mlp.experts")
        entries = checkpoint.layers()
        texts = [repr(linear), repr(moe), *map(repr, entries), repr(checkpoint)]
        texts += [repr(checkpoint.config), repr(checkpoint.files)]
    for text in texts:
        assert "tensor(" not in text and "QuantKey" not in text and len(text) < 400, text
    assert "w4a16_nvfp4" in repr(linear) and "uint8" in repr(linear) and "cpu" in repr(linear)
    assert "[32, 16]" in repr(linear) and "float8_e4m3fn" in repr(linear)
    assert "experts=2" in repr(moe) and "w4a16_nvfp4" in repr(moe)
    assert all("w4a16_nvfp4" in repr(e) and e.name in repr(e) for e in entries)
    big = NVFP4Tensor.quantize(torch.randn(4, 256, 512))
    assert len(repr(big)) < 400 and len(repr(MoEWeights(
        NVFP4Tensor.quantize(torch.randn(4, 64, 32), shards=2),
        NVFP4Tensor.quantize(torch.randn(4, 32, 32)),
    ))) < 600
