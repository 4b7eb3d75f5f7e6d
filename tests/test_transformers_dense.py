"""Dense decoder models, and MoE models with dense layers and shared experts, through the
transformers integration (issue 15, item 22), on the CPU with the reference backend.

Tiny models from the example's builder (hidden 128, 2 layers, vocab 256, dense MLPs of 256;
Qwen2-MoE and Qwen3-MoE: 8 experts, top-2) are quantized with ``save_nvfp4``, loaded back with
``load_nvfp4`` into models of other random weights, or quantized in place with
``quantize_model``, and compared with the 16-bit (float32) model. Also: progress bars, and the
errors for what the integration cannot take.
"""

from __future__ import annotations

import copy
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config

from quantoracle.errors import UnsupportedModelError
from quantoracle.integrations.transformers import NVFP4Experts, load_nvfp4, quantize_model, save_nvfp4
from quantoracle.layers import NVFP4Linear

from transformers_helpers import MAX_ERROR, MIN_TOP1, example  # noqa: E402

# The MoE tests' thresholds (tests/transformers_helpers.py) hold here too. Measured on these
# models, correct implementations: W4A16 (and W4A4 served weight-only) top-1 0.79-0.88, relative
# logit error 0.08-0.13; W4A4 emulated top-1 0.75-0.85, error 0.12-0.18. A Llama checkpoint with
# gate_proj and up_proj swapped (silu(up) * gate) fails both:
# test_swapped_gate_and_up_fail_the_thresholds shows it on every run.

ARCHS = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "qwen2_moe": {},  # a shared expert (Linear gate/up/down) beside the routed experts
    "qwen3_moe": {"mlp_only_layers": [0]},  # layer 0 dense, layer 1 MoE
}


@dataclass
class Tiny:
    arch: str
    config: object
    model: nn.Module  # the 16-bit model, never patched
    ids: torch.Tensor
    reference: torch.Tensor
    calibration_ids: torch.Tensor
    work: Path

    def fresh(self) -> nn.Module:
        return example.build_model(self.config, seed=2)

    def replaceable(self) -> dict[str, str]:
        """Module name -> kind of every module a checkpoint of the defaults quantizes."""
        found = {}
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head" and not name.endswith("shared_expert_gate"):
                found[name] = "linear"
            elif isinstance(getattr(module, "gate_up_proj", None), torch.Tensor):
                found[name] = "moe"
        return found

    def agreement(self, model: nn.Module) -> tuple[float, float]:
        """(top-1 agreement, relative logit error) of ``model`` against the 16-bit model."""
        with torch.no_grad():
            return example.agreement(model(self.ids).logits, self.reference)


def _tiny(arch: str, work: Path) -> Tiny:
    config = example.model_config(arch, "tiny", **ARCHS[arch])
    model = example.build_model(config)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=generator)
    calibration_ids = torch.randint(0, config.vocab_size, (4, 64), generator=generator)
    with torch.no_grad():
        reference = model(ids).logits
    return Tiny(arch, config, model, ids, reference, calibration_ids, work)


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tmp_path_factory) -> Tiny:
    return _tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny_w4a4(request, tmp_path_factory) -> Tiny:
    return _tiny(request.param, tmp_path_factory.mktemp(f"{request.param}-w4a4"))


def _assert_close(tiny: Tiny, model: nn.Module, policy: str, what: str) -> None:
    top1, error = tiny.agreement(model)
    print(f"{tiny.arch} {what}: top-1 agreement {top1:.3f}, relative logit error {error:.3f}")
    assert top1 >= MIN_TOP1 and error <= MAX_ERROR[policy], (top1, error)


def test_w4a16_checkpoint_round_trip(tiny):
    checkpoint = save_nvfp4(tiny.model, tiny.work / "w4a16", "w4a16_nvfp4")
    saved = load_file(checkpoint / "model.safetensors")
    # The checkpoint keeps the model's own names; lm_head and embeddings stay 16-bit.
    for name, kind in tiny.replaceable().items():
        if kind == "linear":
            assert saved[f"{name}.weight"].dtype == torch.uint8 and f"{name}.weight_scale" in saved, name
    assert saved["lm_head.weight"].dtype == torch.float32
    assert saved["model.embed_tokens.weight"].dtype == torch.float32

    model = tiny.fresh()
    summary = load_nvfp4(model, checkpoint, progress=False)

    assert {layer.name: layer.kind for layer in summary.replaced} == tiny.replaceable()
    assert "lm_head" in summary.untouched
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), NVFP4Linear)
    if tiny.arch == "qwen3_moe":  # mlp_only_layers: a dense MLP in layer 0, experts in layer 1
        assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), NVFP4Linear)
        assert isinstance(model.get_submodule("model.layers.1.mlp.experts"), NVFP4Experts)
    if tiny.arch == "qwen2_moe":
        assert isinstance(model.get_submodule("model.layers.0.mlp.shared_expert.up_proj"), NVFP4Linear)
        assert type(model.get_submodule("model.layers.0.mlp.shared_expert_gate")) is nn.Linear
    _assert_close(tiny, model, "weight_only", "w4a16 checkpoint")


@pytest.mark.parametrize("policy", ["weight_only", "emulate"])
def test_w4a4_checkpoint_loads_weight_only_or_emulated(tiny_w4a4, policy):
    tiny = tiny_w4a4
    checkpoint = tiny.work / "w4a4"
    if not checkpoint.exists():
        save_nvfp4(tiny.model, checkpoint, "w4a4_nvfp4", calibration_input_ids=tiny.calibration_ids)
    model = tiny.fresh()
    summary = load_nvfp4(model, checkpoint, activation_fallback=policy, progress=False)

    assert {(layer.scheme, layer.fallback) for layer in summary.replaced} == {("w4a4_nvfp4", policy)}
    _assert_close(tiny, model, policy, f"w4a4 checkpoint ({policy})")


@pytest.mark.parametrize("scheme, policy", [("w4a16_nvfp4", "weight_only"), ("w4a4_nvfp4", "emulate")])
def test_quantize_model_in_place(tiny_w4a4, scheme, policy):
    tiny = tiny_w4a4
    model = copy.deepcopy(tiny.model)
    summary = quantize_model(
        model, scheme, calibration_input_ids=tiny.calibration_ids, activation_fallback=policy, progress=False
    )

    assert {layer.name for layer in summary.replaced} == set(tiny.replaceable())
    _assert_close(tiny, model, policy, f"{scheme} quantize_model ({policy})")


def test_swapped_gate_and_up_fail_the_thresholds(tmp_path):
    """The thresholds above catch a broken mapping: the same checkpoint with each layer's
    gate_proj and up_proj tensors exchanged."""
    tiny = _tiny("llama", tmp_path)
    checkpoint = save_nvfp4(tiny.model, tmp_path / "w4a16", "w4a16_nvfp4")
    tensors = load_file(checkpoint / "model.safetensors")
    swap = {".mlp.gate_proj.": ".mlp.up_proj.", ".mlp.up_proj.": ".mlp.gate_proj."}
    renamed = {}
    for name, tensor in tensors.items():
        for old, new in swap.items():
            if old in name:
                name = name.replace(old, new)
                break
        renamed[name] = tensor
    save_file(renamed, checkpoint / "model.safetensors", metadata={"format": "pt"})

    model = tiny.fresh()
    load_nvfp4(model, checkpoint, progress=False)
    top1, error = tiny.agreement(model)
    print(f"llama, gate and up swapped: top-1 agreement {top1:.3f}, relative logit error {error:.3f}")
    assert top1 < MIN_TOP1 and error > MAX_ERROR["weight_only"], (top1, error)


# ---- progress ----


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal, progress, shown", [(True, True, True), (True, False, False), (False, True, False)])
def test_progress_bar_on_a_terminal_unless_asked_not_to(monkeypatch, terminal, progress, shown):
    tiny_model = example.build_model(example.model_config("llama", "tiny", num_hidden_layers=1))
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    quantize_model(tiny_model, "w4a4_nvfp4", calibration_input_ids=torch.zeros(1, 4, dtype=torch.long),
                   progress=progress, activation_fallback="emulate")
    text = stderr.getvalue()
    assert ("quantize_model" in text and "calibrate" in text) is shown, text


# ---- what the integration cannot take ----


def test_a_module_without_config_is_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"load_nvfp4 patches a transformers model.*got Sequential"):
        load_nvfp4(nn.Sequential(nn.Linear(32, 32)), tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"quantize_model patches a transformers model.*got Linear"):
        quantize_model(nn.Linear(32, 32), "w4a16_nvfp4")


def test_gpt2_conv1d_is_named(tmp_path):
    config = GPT2Config(vocab_size=64, n_embd=64, n_layer=1, n_head=2, n_positions=32)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match=r"transformer\.h\.0\.attn\.c_attn \(transformers Conv1D"):
        quantize_model(model, "w4a16_nvfp4", progress=False)
    with pytest.raises(UnsupportedModelError, match=r"transformer\.h\.0\.attn\.c_attn \(transformers Conv1D"):
        save_nvfp4(model, tmp_path / "gpt2", "w4a16_nvfp4")  # its transposed weights would be misquantized
    excluded = ("lm_head", "*wte", "*.c_attn", "*.c_proj", "*.c_fc")
    summary = quantize_model(model, "w4a16_nvfp4", exclude_modules=excluded, progress=False)
    assert summary.replaced == () and "transformer.h.0.attn.c_attn" in summary.untouched


def test_stacked_weights_in_an_unknown_layout_are_named():
    class StackedExperts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Parameter(torch.zeros(4, 32, 32))

    model = example.build_model(example.model_config("llama", "tiny", num_hidden_layers=1))
    model.model.layers[0].mlp.add_module("experts", StackedExperts())
    found = r"model\.layers\.0\.mlp\.experts \(StackedExperts\) holds stacked weights \{'w1': \[4, 32, 32\]\}"
    with pytest.raises(UnsupportedModelError, match=found):
        quantize_model(model, "w4a16_nvfp4", progress=False)


def test_checkpoint_layers_the_model_lacks_are_named(tmp_path):
    two_layers = example.build_model(example.model_config("llama", "tiny"))
    checkpoint = save_nvfp4(two_layers, tmp_path / "two", "w4a16_nvfp4")
    one_layer = example.build_model(example.model_config("llama", "tiny", num_hidden_layers=1))
    found = r"quantizes linear model\.layers\.1\.\S+ and 6 more layers that this model cannot take: LlamaForC"
    with pytest.raises(UnsupportedModelError, match=found):
        load_nvfp4(one_layer, checkpoint, progress=False)

    class Projection(nn.Module):  # a Linear's weight in a module quantoracle does not replace
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.weight = linear.weight

    other = example.build_model(example.model_config("llama", "tiny"))
    other.model.layers[1].mlp.down_proj = Projection(other.model.layers[1].mlp.down_proj)
    found = r"quantizes linear model\.layers\.1\.mlp\.down_proj that this model cannot take: .*\(Projection\)"
    with pytest.raises(UnsupportedModelError, match=found):
        load_nvfp4(other, checkpoint, progress=False)


def test_exclude_modules_adds_to_the_defaults():
    model = example.build_model(example.model_config("llama", "tiny", num_hidden_layers=1))
    summary = quantize_model(copy.deepcopy(model), "w4a16_nvfp4", exclude_modules=("*.self_attn.*",), progress=False)
    assert set(summary.untouched) == {"lm_head", *(f"model.layers.0.self_attn.{p}_proj" for p in "qkvo")}
    alone = quantize_model(model, "w4a16_nvfp4", exclude_modules=("*.self_attn.*",), default_exclude=False,
                           progress=False)
    assert "lm_head" in {layer.name for layer in alone.replaced}
