"""``quantoracle demo``: the whole path on whatever machine this is, with no network.

1. Build a small bf16 MoE model (Qwen3-MoE naming: per layer a dense ``o_proj`` and a MoE block of
   ``experts`` experts with a router ``mlp.gate``) from a seed, and calibrate its input ranges.
2. Write it as real ModelOpt NVFP4 checkpoints, W4A16 and W4A4, to a temporary directory.
3. Read each back, resolve every layer on the current device, build the layer modules, run them.
4. Compare with the bf16 model and print the resolution table, the error and the time.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quantoracle.layers import NVFP4FusedMoE, NVFP4Linear
from quantoracle.oracle.engine import ActivationFallback
from quantoracle.schemes.checkpoint import Checkpoint, write_checkpoint
from quantoracle.schemes.scheme import W4A4_NVFP4, W4A16_NVFP4, Scheme


@dataclass(frozen=True)
class ToyConfig:
    layers: int = 2
    experts: int = 16
    hidden: int = 256
    intermediate: int = 128
    top_k: int = 4
    tokens: int = 64

    @classmethod
    def for_device(cls, device: torch.device) -> "ToyConfig":
        """CPU: seconds on two cores. GPU: Qwen3-30B-A3B-like widths, so the kernels matter."""
        if device.type == "cuda":
            return cls(layers=2, experts=64, hidden=2048, intermediate=768, top_k=8, tokens=256)
        return cls()


def _module(layer: int, part: str) -> str:
    return f"model.layers.{layer}.{part}"


def make_model(cfg: ToyConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A bf16 state dict: ``o_proj`` [H, H], router ``mlp.gate`` [E, H], experts' projections."""
    gen = torch.Generator().manual_seed(seed)
    scale = lambda fan_in: fan_in**-0.5  # noqa: E731
    h, i = cfg.hidden, cfg.intermediate
    state = {}
    for layer in range(cfg.layers):
        state[f"{_module(layer, 'self_attn.o_proj')}.weight"] = torch.randn(h, h, generator=gen) * scale(h)
        state[f"{_module(layer, 'mlp.gate')}.weight"] = torch.randn(cfg.experts, h, generator=gen) * scale(h)
        for e in range(cfg.experts):
            prefix = _module(layer, f"mlp.experts.{e}")
            state[f"{prefix}.gate_proj.weight"] = torch.randn(i, h, generator=gen) * scale(h)
            state[f"{prefix}.up_proj.weight"] = torch.randn(i, h, generator=gen) * scale(h)
            state[f"{prefix}.down_proj.weight"] = torch.randn(h, i, generator=gen) * scale(i)
    return {name: w.to(torch.bfloat16) for name, w in state.items()}


def _rms(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)


def forward(
    cfg: ToyConfig,
    x: torch.Tensor,
    dense: Callable[[int, torch.Tensor], torch.Tensor],
    router: Callable[[int, torch.Tensor], torch.Tensor],
    moe: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The toy model: per layer ``h += o_proj(rms(h))``, then ``h += moe(rms(h))``."""
    h = x
    for layer in range(cfg.layers):
        h = h + dense(layer, _rms(h))
        r = _rms(h)
        h = h + moe(layer, r, router(layer, r))
    return h


class FloatModel:
    """The bf16 model, run in float32, recording each quantized module's input max |x| (the
    calibration a W4A4 export needs: gate and up see the block input, down sees silu(g)*u)."""

    def __init__(self, cfg: ToyConfig, state: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self.cfg = cfg
        self.w = {name: t.to(device=device, dtype=torch.float32) for name, t in state.items()}
        self.amax: dict[str, float] = {}

    def _record(self, name: str, x: torch.Tensor) -> None:
        self.amax[name] = max(self.amax.get(name, 0.0), float(x.abs().max()) if x.numel() else 0.0)

    def dense(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        name = _module(layer, "self_attn.o_proj")
        self._record(name, x)
        return x @ self.w[f"{name}.weight"].T

    def router(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w[f"{_module(layer, 'mlp.gate')}.weight"].T

    def moe(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        weights, ids = torch.topk(torch.softmax(logits.float(), -1), self.cfg.top_k)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.cfg.experts):
            token, slot = (ids == e).nonzero(as_tuple=True)
            p = _module(layer, f"mlp.experts.{e}")
            xe = x[token]
            for proj in ("gate_proj", "up_proj"):
                self._record(f"{p}.{proj}", x)  # every expert is calibrated on the whole batch
            hidden = F.silu(xe @ self.w[f"{p}.gate_proj.weight"].T) * (xe @ self.w[f"{p}.up_proj.weight"].T)
            self._record(f"{p}.down_proj", hidden)
            out.index_add_(0, token, (hidden @ self.w[f"{p}.down_proj.weight"].T) * weights[token, slot, None])
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return forward(self.cfg, x, self.dense, self.router, self.moe)


class QuantizedModel:
    """The same model, each quantized layer a quantoracle module built from the checkpoint."""

    def __init__(
        self, cfg: ToyConfig, checkpoint_dir: Path, device: torch.device, dtype: torch.dtype,
        activation_fallback: ActivationFallback, verify: str | None = None,
    ) -> None:
        self.cfg = cfg
        ckpt = Checkpoint.open(checkpoint_dir)
        options = dict(dtype=dtype, activation_fallback=activation_fallback, verify=verify)
        self.dense_layers = [
            NVFP4Linear.from_checkpoint(ckpt, _module(layer, "self_attn.o_proj"), device=device, **options)
            for layer in range(cfg.layers)
        ]
        self.moe_layers = [
            NVFP4FusedMoE.from_checkpoint(ckpt, _module(layer, "mlp.experts"), top_k=cfg.top_k, device=device, **options)
            for layer in range(cfg.layers)
        ]
        self.routers = [ckpt.files[f"{_module(layer, 'mlp.gate')}.weight"].to(device, dtype) for layer in range(cfg.layers)]
        self.dtype = dtype

    def layers(self) -> list[Any]:
        return [*self.dense_layers, *self.moe_layers]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return forward(
            self.cfg, x.to(self.dtype),
            lambda layer, h: self.dense_layers[layer](h),
            lambda layer, h: h @ self.routers[layer].T,
            lambda layer, h, logits: self.moe_layers[layer](h, logits),
        )


def weight_error(checkpoint_dir: Path, state: Mapping[str, torch.Tensor]) -> float:
    """Relative RMS error of all quantized weights, dequantized, against the bf16 originals: the
    error NVFP4 itself brings, which bounds what any kernel can do."""
    num = den = 0.0
    with Checkpoint.open(checkpoint_dir) as ckpt:
        for entry in ckpt.layers():
            if entry.kind == "linear":
                pairs = [(ckpt.linear(entry.name).dequantize(), state[f"{entry.name}.weight"])]
            else:
                moe = ckpt.moe(entry.name)
                gate_up, down = moe.gate_up.dequantize(), moe.down.dequantize()
                i = entry.intermediate
                pairs = [
                    pair for e in range(entry.experts) for pair in (
                        (gate_up[e, :i], state[f"{entry.name}.{e}.gate_proj.weight"]),
                        (gate_up[e, i:], state[f"{entry.name}.{e}.up_proj.weight"]),
                        (down[e], state[f"{entry.name}.{e}.down_proj.weight"]),
                    )
                ]
            for got, want in pairs:
                num += float((got - want.float()).pow(2).sum())
                den += float(want.float().pow(2).sum())
    return (num / den) ** 0.5


TIMED_RUNS = 5


def _time(fn: Callable[[], torch.Tensor], device: torch.device, runs: int = TIMED_RUNS) -> float:
    """Seconds per call of ``fn``: the median of ``runs`` host-timed calls (synchronized on a
    GPU), after one untimed warm-up call (compilation and caches stay out of the number)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


VARIANTS: tuple[tuple[str, Scheme, ActivationFallback], ...] = (
    ("W4A16", W4A16_NVFP4, "weight_only"),
    ("W4A4", W4A4_NVFP4, "weight_only"),
    ("W4A4", W4A4_NVFP4, "emulate"),
)


def run(device: torch.device | None = None, cfg: ToyConfig | None = None, workdir: Path | None = None,
        progress: bool = True, verify: str | None = None) -> dict[str, Any]:
    """Run the demo; return a JSON-ready report (``quantoracle demo --json`` prints it). Every
    ``*_ms`` is the median of ``report["timing"]["runs"]`` calls of the whole model. ``verify``:
    the layers' numerics-check policy (:mod:`quantoracle.verify`; default ``$QUANTORACLE_VERIFY``,
    else ``"first_use"``); each layer's checks are in the report."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = cfg or ToyConfig.for_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    state = make_model(cfg)
    x = torch.randn(cfg.tokens, cfg.hidden, generator=torch.Generator().manual_seed(1)).to(device)
    float_model = FloatModel(cfg, state, device)
    want = float_model(x)
    float_seconds = _time(lambda: float_model(x), device)

    report: dict[str, Any] = {"device": str(device), "config": asdict(cfg), "dtype": str(dtype).removeprefix("torch."),
                              "float_ms": float_seconds * 1e3,
                              "timing": {"statistic": "median", "runs": TIMED_RUNS, "warmup_runs": 1},
                              "variants": []}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        written: dict[str, Path] = {}
        for label, scheme, policy in VARIANTS:
            if label not in written:
                written[label] = Path(tmp) / label.lower()
                write_checkpoint(written[label], state, scheme, input_amax=float_model.amax, progress=progress)
                report.setdefault("weight_rel_error", weight_error(written[label], state))
            model = QuantizedModel(cfg, written[label], device, dtype, policy, verify)
            got = model(x).float()
            seconds = _time(lambda: model(x), device)
            report["variants"].append({
                "checkpoint": label, "activation_fallback": policy,
                "rel_error": float((got - want).norm() / want.norm()),
                "ms": seconds * 1e3,
                "layers": [{"name": m.layer_name, "scheme": m.resolution.problem.scheme.name,
                            "backend": m.backend, "fallback": m.resolution.fallback,
                            "plan": m.plan.to_list(), "verification": [c.describe() for c in m.verification]}
                           for m in model.layers()],
                "weight_bytes": sum(m.weight_bytes for m in model.layers()),
            })
    report["float_weight_bytes"] = sum(t.numel() * 2 for name, t in state.items() if not name.endswith("mlp.gate.weight"))
    return report
