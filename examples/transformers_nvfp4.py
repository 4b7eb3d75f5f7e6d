"""transformers models on NVFP4 weights through quantoracle, end to end, offline.

For MoE (Qwen3-MoE, Mixtral, Qwen2-MoE with its shared expert) and dense models (Llama, Mistral,
Qwen2, Qwen3): build a small model from a config with random weights, save it with
``save_pretrained``, quantize it to ModelOpt NVFP4 checkpoints (W4A16, and W4A4 calibrated on
random tokens) with ``save_nvfp4`` (on the model's device; the same files as
``quantize_checkpoint`` of the saved directory), load each back into a model built from the
config with ``load_nvfp4``, and compare with the 16-bit model: top-1 agreement and relative
error of the logits, checkpoint sizes, and ``generate`` tokens/s.

    python examples/transformers_nvfp4.py                      # CPU, reference backend
    python examples/transformers_nvfp4.py --device cuda --out results.json

``--size small`` (the default on CUDA) is large enough for the kernels to matter a little;
tokens/s of such models still measure per-token overheads more than weight bandwidth.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from quantoracle.integrations.transformers import load_nvfp4, save_nvfp4

SIZES = {
    "tiny": dict(vocab=256, hidden=128, layers=2, heads=4, experts=8, top_k=2, intermediate=64),
    "small": dict(vocab=4096, hidden=1024, layers=4, heads=16, experts=32, top_k=4, intermediate=256),
}
RUNS = (("w4a16_nvfp4", "weight_only"), ("w4a4_nvfp4", "weight_only"), ("w4a4_nvfp4", "emulate"))
MOE_ARCHS = ("qwen3_moe", "mixtral", "qwen2_moe")
DENSE_ARCHS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


def model_config(arch: str, size: str, **overrides):
    """A config of ``arch`` (one of :data:`MOE_ARCHS` or :data:`DENSE_ARCHS`) and one of
    :data:`SIZES`; ``overrides`` are further config fields (e.g. Qwen3-MoE's ``mlp_only_layers``).
    Dense MLPs (dense models, MoE models' dense layers and shared experts) are 4x an expert."""
    s = SIZES[size]
    fields = dict(
        vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["heads"] // 2,
        max_position_embeddings=1024, intermediate_size=4 * s["intermediate"],
    )
    moe = dict(num_experts_per_tok=s["top_k"], moe_intermediate_size=s["intermediate"])
    if arch == "qwen3_moe":
        fields.update(moe, head_dim=s["hidden"] // s["heads"], num_experts=s["experts"], norm_topk_prob=True)
        return Qwen3MoeConfig(**{**fields, **overrides})
    if arch == "qwen2_moe":
        fields.update(moe, num_experts=s["experts"], shared_expert_intermediate_size=4 * s["intermediate"])
        return Qwen2MoeConfig(**{**fields, **overrides})
    if arch == "mixtral":
        fields.update(num_experts_per_tok=s["top_k"], num_local_experts=s["experts"], intermediate_size=s["intermediate"])
        return MixtralConfig(**{**fields, **overrides})
    if arch == "qwen3":
        fields.update(head_dim=s["hidden"] // s["heads"])
    return DENSE_ARCHS[arch](**{**fields, **overrides})


def build_model(config, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A model with random weights scaled so that every block matters to the logits.

    transformers' default init (std 0.02) leaves the residual stream to the embeddings, so the
    experts barely move the logits and a broken MoE would go unnoticed. Here embeddings are
    N(0, 1); experts, dense MLPs, lm_head and attention v/o have unit gain (std 1/sqrt(fan_in), v/o half
    that); q/k stay small (near-uniform attention: smooth, not chaotic); the router's logits
    have std 0.5, so top-k is not saturated and the router weights matter.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[-1]
            if "norm" in name:
                continue
            if "embed_tokens" in name:
                p.normal_(0, 1)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0, 0.02)
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                p.normal_(0, 0.5 / math.sqrt(fan_in))
            elif name.endswith("gate.weight"):
                p.normal_(0, 0.5 / math.sqrt(fan_in))
            else:
                p.normal_(0, 1 / math.sqrt(fan_in))
    return model


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement over positions, ||logits - reference|| / ||reference||), in float32."""
    logits, reference = logits.float(), reference.float()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return top1, ((logits - reference).norm() / reference.norm()).item()


def tokens_per_second(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (after one warm-up run)."""
    def run():
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    run()
    if prompt.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = run()
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return new_tokens * prompt.shape[0] / (time.perf_counter() - start), out


def _megabytes(directory: Path) -> float:
    return round(sum(f.stat().st_size for f in Path(directory).glob("*.safetensors")) / 1e6, 2)


def run_arch(arch: str, size: str, device: str, dtype: torch.dtype, work: Path, new_tokens: int) -> dict:
    config = model_config(arch, size)
    model = build_model(config, dtype=dtype, device=device)
    source = work / f"{arch}-16bit"
    model.save_pretrained(source)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=generator).to(device)
    calibration = torch.randint(0, config.vocab_size, (8, 64), generator=generator).to(device)
    with torch.no_grad():
        reference = model(ids).logits
    speed, _ = tokens_per_second(model, ids[:1, :16], new_tokens)
    result = {
        "arch": arch, "size": size, "dtype": str(dtype), "16bit_tokens_per_s": round(speed, 1),
        "16bit_megabytes": _megabytes(source), "runs": [],
    }
    print(f"{arch} ({size}, {dtype}): 16-bit {result['16bit_megabytes']} MB, generate {speed:.1f} tokens/s")
    checkpoints = {
        scheme: save_nvfp4(model, work / f"{arch}-{scheme}", scheme, calibration_input_ids=calibration)
        for scheme in dict(RUNS)
    }
    del model
    for scheme, policy in RUNS:
        patched = build_model(config, seed=2, dtype=dtype, device=device)  # weights come from the checkpoint
        summary = load_nvfp4(patched, checkpoints[scheme], activation_fallback=policy)
        with torch.no_grad():
            top1, rel = agreement(patched(ids).logits, reference)
        speed, generated = tokens_per_second(patched, ids[:1, :16], new_tokens)
        backends = ", ".join(sorted({layer.backend for layer in summary.replaced}))
        print(f"  {scheme} ({policy}, {_megabytes(checkpoints[scheme])} MB): top-1 {top1:.3f}, "
              f"relative logit error {rel:.3f}, {speed:.1f} tokens/s on {backends}")
        result["runs"].append({
            "scheme": scheme, "activation_fallback": policy, "megabytes": _megabytes(checkpoints[scheme]),
            "top1_agreement": round(top1, 4), "relative_logit_error": round(rel, 4),
            "tokens_per_s": round(speed, 1), "generated": generated[0, 16:].tolist(),
            "summary": summary.to_dict(),
        })
        if (scheme, policy) == RUNS[-1]:
            print("\n".join("    " + line for line in str(summary).splitlines()))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", choices=SIZES, help="model size (default: tiny on CPU, small on CUDA)")
    parser.add_argument("--arch", choices=(*MOE_ARCHS, *DENSE_ARCHS), action="append",
                        help="repeatable (default: qwen3_moe, mixtral, llama, qwen3)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    size = args.size or ("small" if cuda else "tiny")
    dtype = torch.bfloat16 if cuda else torch.float32
    results = {"device": torch.cuda.get_device_name(args.device) if cuda else "cpu", "archs": []}
    with tempfile.TemporaryDirectory() as work:
        for arch in args.arch or ("qwen3_moe", "mixtral", "llama", "qwen3"):
            results["archs"].append(run_arch(arch, size, args.device, dtype, Path(work), args.new_tokens))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
