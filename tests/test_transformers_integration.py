"""transformers MoE models on NVFP4 through quantoracle, on the CPU with the reference backend.

Tiny Qwen3-MoE and Mixtral (hidden 128, 2 layers, 8 experts, top-2, vocab 256; the example's
builder) are saved with ``save_pretrained``, quantized to ModelOpt NVFP4 checkpoints, loaded
back with ``load_nvfp4`` and compared with the 16-bit (here float32) model.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from quantoracle.errors import CheckpointFormatError, SchemeError
from quantoracle.integrations.transformers import (
    Calibration,
    NVFP4Experts,
    ReplacedLayer,
    Summary,
    UnsupportedModelError,
    calibrate,
    load_nvfp4,
    quantize_model,
    save_nvfp4,
)
from quantoracle.layers import NVFP4Linear
from quantoracle.oracle import ForcedBackendError
from quantoracle.schemes.checkpoint import SafetensorsDirectory, quantize_checkpoint
from quantoracle.schemes.checkpoint.detect import read_json
from quantoracle.schemes.tensors import NVFP4Tensor

from transformers_helpers import MAX_ERROR, MIN_TOP1, example  # noqa: E402  (thresholds: see there)

RUNS = [("w4a16_nvfp4", "weight_only"), ("w4a4_nvfp4", "weight_only"), ("w4a4_nvfp4", "emulate")]
FALLBACK = {RUNS[0]: None, RUNS[1]: "weight_only", RUNS[2]: "emulate"}


@dataclass
class Tiny:
    arch: str
    config: object
    model: nn.Module  # the 16-bit model, never patched
    ids: torch.Tensor  # [4, 64] evaluation tokens
    reference: torch.Tensor  # its logits
    calibration_ids: torch.Tensor
    calibration: Calibration
    checkpoints: dict[str, Path]  # quantize_checkpoint of the save_pretrained directory

    def fresh(self) -> nn.Module:
        """The same architecture with other random weights (load_nvfp4 overwrites them all)."""
        return example.build_model(self.config, seed=2)

    def replaceable(self) -> set[str]:
        return {
            name for name, m in self.model.named_modules()
            if (isinstance(m, nn.Linear) and name != "lm_head") or hasattr(m, "gate_up_proj")
        }


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def tiny(request, tmp_path_factory) -> Tiny:
    config = example.model_config(request.param, "tiny")
    model = example.build_model(config)
    work = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(work / "16bit")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=generator)
    calibration_ids = torch.randint(0, config.vocab_size, (4, 64), generator=generator)
    with torch.no_grad():
        reference = model(ids).logits
    calibration = calibrate(model, calibration_ids)
    checkpoints = {
        scheme: quantize_checkpoint(
            work / "16bit", work / scheme, scheme, progress=False,
            input_amax=None if scheme == "w4a16_nvfp4" else calibration.checkpoint,
        )
        for scheme in ("w4a16_nvfp4", "w4a4_nvfp4")
    }
    return Tiny(request.param, config, model, ids, reference, calibration_ids, calibration, checkpoints)


def _check_logits(model: nn.Module, tiny: Tiny, policy: str, what: str) -> None:
    with torch.no_grad():
        top1, error = example.agreement(model(tiny.ids).logits, tiny.reference)
    print(f"{tiny.arch} {what}: top-1 agreement {top1:.3f}, relative logit error {error:.3f}")
    assert top1 >= MIN_TOP1 and error <= MAX_ERROR[policy], (top1, error)


@pytest.mark.parametrize("scheme, policy", RUNS)
def test_checkpoint_loads_back_and_tracks_the_16bit_model(tiny, scheme, policy):
    model = tiny.fresh()
    summary = load_nvfp4(model, tiny.checkpoints[scheme], activation_fallback=policy)

    assert {layer.name for layer in summary.replaced} == tiny.replaceable()
    assert summary.untouched == ("lm_head",)
    assert {(layer.scheme, layer.backend, layer.fallback) for layer in summary.replaced} == {
        (scheme, "reference", FALLBACK[(scheme, policy)])
    }
    assert {layer.kind for layer in summary.replaced if layer.name.endswith(".mlp.experts")} == {"moe"}
    _check_logits(model, tiny, policy, f"{scheme} checkpoint ({policy})")


@pytest.mark.parametrize("scheme, policy", [RUNS[0], RUNS[2]])
def test_quantize_model_in_place(tiny, scheme, policy):
    model = copy.deepcopy(tiny.model)
    summary = quantize_model(
        model, scheme, calibration_input_ids=tiny.calibration_ids, activation_fallback=policy
    )

    assert {layer.name for layer in summary.replaced} == tiny.replaceable()
    experts = model.get_submodule("model.layers.1.mlp.experts")
    assert isinstance(experts, NVFP4Experts) and experts.resolution.fallback == FALLBACK[(scheme, policy)]
    _check_logits(model, tiny, policy, f"{scheme} quantize_model ({policy})")


def test_excluded_modules_stay_and_generate_runs(tiny):
    model = tiny.fresh()
    names = ("lm_head", "model.embed_tokens", "model.layers.0.mlp.gate")
    kept = {name: model.get_submodule(name) for name in names}
    load_nvfp4(model, tiny.checkpoints["w4a16_nvfp4"])

    for name, module in kept.items():
        assert model.get_submodule(name) is module  # the same module, not replaced
        assert torch.equal(module.weight, tiny.model.get_submodule(name).weight)  # the checkpoint's weights
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), NVFP4Linear)

    prompt = tiny.ids[:1, :8]
    out = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        first = model(prompt).logits[0, -1].argmax()
    assert out.shape == (1, 14) and torch.equal(out[0, :8], prompt[0]) and out[0, 8] == first


def test_experts_equal_transformers_forward_on_dequantized_weights(tiny):
    """The replaced experts (quantoracle's NVFP4 weights, reference backend, this wrapper's
    argument order) against transformers' own experts module holding the dequantized weights,
    both fed the model's own router output."""
    model = copy.deepcopy(tiny.model)
    original = copy.deepcopy(model.get_submodule("model.layers.0.mlp.experts"))
    router = model.get_submodule("model.layers.0.mlp.gate")
    quantize_model(model, "w4a16_nvfp4")
    experts = model.get_submodule("model.layers.0.mlp.experts")
    with torch.no_grad():
        original.gate_up_proj.copy_(NVFP4Tensor.quantize(original.gate_up_proj, shards=2).dequantize())
        original.down_proj.copy_(NVFP4Tensor.quantize(original.down_proj).dequantize())
        hidden = torch.randn(96, tiny.config.hidden_size, generator=torch.Generator().manual_seed(3))
        _, weights, ids = router(hidden)
        expected = original(hidden, ids, weights)
        torch.testing.assert_close(experts(hidden, ids, weights), expected, rtol=1e-4, atol=1e-5)


def test_calibration_records_inputs_per_module_and_expert(tiny):
    modules, checkpoint = tiny.calibration.modules, tiny.calibration.checkpoint
    embedded = tiny.model.model.embed_tokens(tiny.calibration_ids)
    q_input = tiny.model.model.layers[0].input_layernorm(embedded)
    assert modules["model.layers.0.self_attn.q_proj"] == q_input.abs().amax()
    assert modules["model.layers.0.self_attn.k_proj"] == modules["model.layers.0.self_attn.q_proj"]

    # The MoE block's input, then each expert's routed tokens and act(gate) * up, by hand.
    block = tiny.model.get_submodule("model.layers.1.mlp")
    seen = []
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        tiny.model(tiny.calibration_ids)
    handle.remove()
    x = seen[0].reshape(-1, tiny.config.hidden_size)
    _, _, ids = block.gate(x)
    amax = modules["model.layers.1.mlp.experts"]
    # The names save_pretrained writes (Mixtral's experts as ModelOpt and the original export).
    qwen = tiny.arch == "qwen3_moe"
    prefix = f"model.layers.1.{'mlp' if qwen else 'block_sparse_moe'}.experts"
    gate_name, down_name = ("gate_proj", "down_proj") if qwen else ("w1", "w2")
    inter = block.experts.intermediate_dim
    for e in range(8):
        xe = x[(ids == e).any(-1)]
        w = block.experts.gate_up_proj[e]
        hidden = torch.nn.functional.silu(xe @ w[:inter].T) * (xe @ w[inter:].T)
        expected = torch.stack([xe.abs().amax(), xe.abs().amax(), hidden.abs().amax()])
        torch.testing.assert_close(amax[e], expected, rtol=1e-6, atol=0)
        assert checkpoint[f"{prefix}.{e}.{gate_name}"] == float(amax[e, 0])
        assert checkpoint[f"{prefix}.{e}.{down_name}"] == float(amax[e, 2])

    # One token reaches top-k = 2 experts per layer; the others take the layer's max.
    one = calibrate(tiny.model, tiny.ids[0, :1]).modules["model.layers.0.mlp.experts"]
    assert (one == one.amax(dim=0)).all(dim=1).sum() >= 8 - 2


def test_save_nvfp4_writes_what_quantize_checkpoint_writes(tiny, tmp_path):
    direct = save_nvfp4(
        tiny.model, tmp_path / "w4a4", "w4a4_nvfp4", calibration_input_ids=tiny.calibration_ids
    )
    expected = tiny.checkpoints["w4a4_nvfp4"]
    assert read_json(direct / "hf_quant_config.json") == read_json(expected / "hf_quant_config.json")
    written, wanted = SafetensorsDirectory(direct), SafetensorsDirectory(expected)
    assert set(written) == set(wanted)
    for name in wanted:
        as_bytes = [t[name].reshape(-1).view(torch.uint8) for t in (written, wanted)]
        assert torch.equal(*as_bytes), name


def test_force_maps_module_globs_to_backends(tiny):
    model = tiny.fresh()
    load_nvfp4(model, tiny.checkpoints["w4a16_nvfp4"], force={"*.q_proj": "reference"})
    forced = {
        name for name, m in model.named_modules()
        if isinstance(m, (NVFP4Linear, NVFP4Experts)) and m.resolution.forced
    }
    assert forced == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    with pytest.raises(ForcedBackendError, match="triton_nvfp4"):
        load_nvfp4(tiny.fresh(), tiny.checkpoints["w4a16_nvfp4"], force={"*.mlp.experts": "triton_nvfp4"})


def test_errors_say_what_to_do(tiny, tmp_path):
    with pytest.raises(SchemeError, match="calibration_input_ids"):
        quantize_model(copy.deepcopy(tiny.model), "w4a4_nvfp4")

    other = copy.deepcopy(tiny.config)
    setattr(other, "moe_intermediate_size" if tiny.arch == "qwen3_moe" else "intermediate_size", 32)
    with pytest.raises(CheckpointFormatError, match="the model it was made from"):
        load_nvfp4(example.build_model(other), tiny.checkpoints["w4a16_nvfp4"])

    patched = tiny.fresh()
    load_nvfp4(patched, tiny.checkpoints["w4a16_nvfp4"])
    with pytest.raises(UnsupportedModelError, match="16-bit model"):
        save_nvfp4(patched, tmp_path / "again", "w4a16_nvfp4")


def test_summary_groups_layers_and_serializes():
    layers = [
        ReplacedLayer(f"model.layers.{i}.mlp.experts", "moe", "w4a4_nvfp4", "reference", "emulate")
        for i in (0, 1, 2, 5)
    ] + [
        ReplacedLayer(f"model.layers.{i}.self_attn.{p}_proj", "linear", "w4a16_nvfp4", "triton_nvfp4", None)
        for i in (0, 1) for p in "qo"
    ]
    summary = Summary(tuple(layers), ("lm_head",))
    assert str(summary) == "\n".join([
        "quantoracle: 8 modules replaced, 1 left 16-bit",
        "  moe w4a4_nvfp4 on reference (fallback: emulate): 4",
        "    model.layers.{0-2,5}.mlp.experts",
        "  linear w4a16_nvfp4 on triton_nvfp4: 4",
        "    model.layers.{0-1}.self_attn.q_proj",
        "    model.layers.{0-1}.self_attn.o_proj",
        "  16-bit: 1",
        "    lm_head",
    ])
    assert json.loads(json.dumps(summary.to_dict()))["replaced"][0] == {
        "name": "model.layers.0.mlp.experts", "kind": "moe", "scheme": "w4a4_nvfp4",
        "backend": "reference", "fallback": "emulate",
    }
