"""Humming's GEMMs behind quantoracle's four kernel entry points.

``prepare_linear`` / ``prepare_moe`` convert the weights once (:mod:`.convert`), then JIT-compile
(NVRTC) every kernel of Humming's own tuning list for the layer (one kernel per range of M, up
to M = 8192 dense and 65536 MoE pairs, the last range open) and launch each once, so no kernel
is compiled or loaded later: ``linear`` / ``fused_moe`` never synchronize with the host and can
be captured in a CUDA graph. Compiled kernels are cached on disk by Humming
(``$HUMMING_CACHE_DIR``, default ``~/.humming/cache``) and in the process (same shapes compile
once); the compile time of each prepare is logged (logger ``quantoracle.backends.humming``) and
kept in the prepared state (``compile_s``).

The fused MoE (W4A16):

1. quantoracle's sort (``routing.indexed_routing``): pairs of local experts, by expert, in blocks
   of the block M that Humming's tuning picks for ``M * top_k`` pairs;
2. Humming's indexed GEMM, gate/up: ``[M * k, 2I]`` per pair (the token's row of x gathered);
3. Humming's input processing with the activation fused: ``act(gate) * up`` -> ``[M * k, I]``;
4. Humming's indexed GEMM, down (``top_k = 1``): ``[M * k, H]`` per pair;
5. quantoracle's weighted top-k sum (``triton_nvfp4.moe.topk_sum``), fp32, -> ``[M, H]``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from quantoracle.backends.humming.convert import Converted, torch_dtype, transform
from quantoracle.backends.humming.routing import indexed_routing
from quantoracle.backends.triton_nvfp4.moe import topk_sum
from quantoracle.errors import NumericsError
from quantoracle.schemes.tensors import MoEWeights, NVFP4Tensor

log = logging.getLogger("quantoracle.backends.humming")

# act(gate) * up for Humming's input processing (``binary_split``: a = first half, b = second),
# evaluated in fp32; the same functions as the reference's F.silu and F.gelu (erf form).
ACTIVATION_IMPL = {
    "silu": "a / (1.f + expf(-a)) * b",
    "gelu": "0.5f * a * (1.f + erff(a * 0.70710678118654752f)) * b",
}


def _locks(device: torch.device) -> torch.Tensor:
    """Stream-K barrier counters (zeroed; every kernel leaves them zeroed), one buffer per layer:
    its GEMMs run one after the other on one stream."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return torch.zeros(max(2048, 16 * sms), dtype=torch.int32, device=device)


@dataclass
class HummingGemm:
    """One converted GEMM, its compute config and Humming's tuning list (``[lo, hi, config]``
    per range ``lo < M <= hi``), as JSON strings for ``humming_forward``."""

    converted: Converted
    compute_config: str
    tuning: list
    tuning_config: str = field(init=False)

    def __post_init__(self) -> None:
        self.tuning_config = json.dumps(self.tuning)

    @property
    def kernels(self) -> int:
        return len(self.tuning)

    def block_m(self, valid_m: int) -> int:
        """The tile M of the kernel Humming picks for ``valid_m`` rows (pairs, for MoE)."""
        for lo, hi, config in self.tuning:
            if lo < valid_m <= hi:
                return int(config["block_shape"][0])
        return int(self.tuning[-1][2]["block_shape"][0])

    def forward(self, inputs: torch.Tensor, locks: torch.Tensor, **kwargs) -> torch.Tensor:
        from humming.forward import humming_forward

        c = self.converted
        return humming_forward(
            c.config, inputs=inputs, weight=c.weight, weight_scale=c.weight_scale,
            weight_scale_2=c.weight_scale_2, locks=locks, compute_config=self.compute_config,
            tuning_config=self.tuning_config, **kwargs,
        )


ENV_MAX_M = "QUANTORACLE_HUMMING_MAX_M"
OPEN = 1 << 30  # the upper bound Humming's launcher reads as "no bound"


def max_m_from_env() -> int | None:
    value = os.environ.get(ENV_MAX_M)
    return int(value) if value else None


def tuning_ranges(tuning: list, max_m: int | None) -> list:
    """Humming's tuning list ``[[lo, hi, config], ...]`` (ranges ``lo < M <= hi`` covering every
    M) cut to the ranges that start below ``max_m``, the last one opened to every larger M (its
    kernel then serves them: correct, maybe not the fastest). ``None`` keeps the whole list."""
    if max_m is None:
        return [list(entry) for entry in tuning]
    kept = [list(entry) for entry in tuning if entry[0] < max_m] or [list(tuning[0])]
    kept[-1][1] = OPEN
    return kept


def _gemm(t: NVFP4Tensor, dtype: torch.dtype, gemm_type: str, what: str, max_m: int | None) -> HummingGemm:
    from humming.tune import get_heuristics_config

    converted = transform(t, dtype, what)
    compute = {"use_f16_accum": False, "use_batch_invariant": False, "gemm_type": gemm_type}
    tuning = get_heuristics_config(converted.config, use_f16_accum=False, use_batch_invariant=False,
                                   gemm_type=gemm_type, device=t.packed.device)
    return HummingGemm(converted, json.dumps(compute), tuning_ranges(tuning, max_m))


def _warm_dense(gemm: HummingGemm, locks: torch.Tensor, dtype: torch.dtype) -> float:
    """Compile the tuning list (first call) and launch each kernel once; the compile seconds."""
    x = torch.zeros(1, gemm.converted.shape.k, dtype=dtype, device=locks.device)
    compile_s = 0.0
    for i, (lo, _, _) in enumerate(gemm.tuning):
        start = time.perf_counter()
        gemm.forward(x, locks, valid_shape_m=lo + 1)
        if i == 0:
            torch.cuda.synchronize(locks.device)
            compile_s = time.perf_counter() - start
    torch.cuda.synchronize(locks.device)
    return compile_s


def _warm_indexed(gemm: HummingGemm, locks: torch.Tensor, dtype: torch.dtype) -> float:
    """As :func:`_warm_dense` for an indexed (MoE) GEMM: one pair routed to expert 0."""
    device = locks.device
    x = torch.zeros(1, gemm.converted.shape.k, dtype=dtype, device=device)
    compile_s = 0.0
    for i, (lo, _, config) in enumerate(gemm.tuning):
        block_m = int(config["block_shape"][0])
        sorted_ids = torch.ones(block_m, dtype=torch.int32, device=device)  # 1 = padding
        sorted_ids[0] = 0
        start = time.perf_counter()
        gemm.forward(x, locks, sorted_ids=sorted_ids,
                     expert_ids=torch.zeros(1, dtype=torch.int32, device=device),
                     num_tokens_padded=torch.full((1,), block_m, dtype=torch.int32, device=device),
                     top_k=1, valid_shape_m=lo + 1)
        if i == 0:
            torch.cuda.synchronize(device)
            compile_s = time.perf_counter() - start
    torch.cuda.synchronize(device)
    return compile_s


def _check_x(x: torch.Tensor, k: int, dtype: torch.dtype, what: str) -> None:
    if x.dtype != dtype:
        raise NumericsError(
            f"humming {what}: prepared (and compiled) for {dtype} activations, found {x.dtype}; "
            "prepare the layer for this dtype"
        )
    if x.shape[-1] != k:
        raise NumericsError(f"humming {what}: x has K = {x.shape[-1]}, the weight expects K = {k}")


def _no_w4a4(quantize_activations: bool) -> None:
    if quantize_activations:
        raise NumericsError(
            "humming serves NVFP4 weight-only (W4A16): W4A4 checkpoints are served with 16-bit "
            "activations (activation_fallback='weight_only')"
        )


# ------------------------------------------------------------------------------------ Linear
@dataclass
class PreparedLinear:
    gemm: HummingGemm
    locks: torch.Tensor
    dtype: torch.dtype
    n: int
    k: int
    compile_s: float

    @property
    def nbytes(self) -> int:
        """Device bytes the prepared layer holds (padded, re-laid weights and the locks)."""
        return self.gemm.converted.nbytes + self.locks.numel() * 4


def prepare_linear(weights: NVFP4Tensor, problem=None, *, dtype: str | torch.dtype | None = None,
                   max_m: int | None = None, variant: str | None = None) -> PreparedLinear:
    """Convert a Linear's NVFP4 weight and compile its kernels for ``dtype`` (default: the
    problem's, else bf16): every range of Humming's tuning list, or those starting below
    ``max_m`` tokens (default ``$QUANTORACLE_HUMMING_MAX_M``, else all). ``variant`` is accepted
    for the engine's contract (Humming has none)."""
    dtype = torch_dtype(dtype or (problem.dtype if problem is not None else torch.bfloat16))
    if weights.packed.dim() != 2:
        raise NumericsError(f"humming linear: weight must be [N, K/2], found {tuple(weights.packed.shape)}")
    start = time.perf_counter()
    max_m = max_m if max_m is not None else max_m_from_env()
    gemm = _gemm(weights, dtype, "dense", "linear", max_m)
    locks = _locks(weights.packed.device)
    compile_s = _warm_dense(gemm, locks, dtype)
    log.info("humming linear N=%d K=%d %s: %d kernels, compile %.2f s, prepare %.2f s",
             weights.rows, weights.cols, dtype, gemm.kernels, compile_s, time.perf_counter() - start)
    return PreparedLinear(gemm, locks, dtype, weights.rows, weights.cols, compile_s)


def linear(x: torch.Tensor, prepared: PreparedLinear, *, quantize_activations: bool = False,
           variant: str | None = None) -> torch.Tensor:
    """``x[..., K] @ W^T`` -> ``[..., N]`` in x.dtype; Humming's dense GEMM, fp32 accumulation."""
    _no_w4a4(quantize_activations)
    _check_x(x, prepared.k, prepared.dtype, "linear")
    x2 = x.reshape(-1, prepared.k)
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], prepared.n)
    y = prepared.gemm.forward(x2, prepared.locks)
    return y.view(*x.shape[:-1], prepared.n)


# --------------------------------------------------------------------------------------- MoE
@dataclass
class PreparedMoE:
    w13: HummingGemm
    w2: HummingGemm
    locks: torch.Tensor
    dtype: torch.dtype
    activation: str
    experts: int
    hidden: int
    intermediate: int
    first_expert: int
    compile_s: float

    @property
    def nbytes(self) -> int:
        return self.w13.converted.nbytes + self.w2.converted.nbytes + self.locks.numel() * 4


def prepare_moe(weights: MoEWeights, problem=None, *, dtype: str | torch.dtype | None = None,
                activation: str | None = None, max_m: int | None = None,
                variant: str | None = None) -> PreparedMoE:
    """Convert the experts (gate/up with its two global-scale shards, down) and compile both
    GEMMs' kernels and the activation for ``dtype`` / ``activation`` (defaults: the problem's,
    else bf16 / silu); ``max_m`` as for :func:`prepare_linear`, counted in routed pairs
    (M * top_k)."""
    dtype = torch_dtype(dtype or (problem.dtype if problem is not None else torch.bfloat16))
    activation = activation or (problem.moe_activation if problem is not None else None) or "silu"
    if activation not in ACTIVATION_IMPL:
        raise NumericsError(f"humming fused_moe: activation {activation!r} is not one of {tuple(ACTIVATION_IMPL)}")
    start = time.perf_counter()
    max_m = max_m if max_m is not None else max_m_from_env()
    w13 = _gemm(weights.gate_up, dtype, "indexed", "fused_moe gate/up", max_m)
    w2 = _gemm(weights.down, dtype, "indexed", "fused_moe down", max_m)
    locks = _locks(weights.gate_up.packed.device)
    compile_s = _warm_indexed(w13, locks, dtype) + _warm_indexed(w2, locks, dtype)
    state = PreparedMoE(w13, w2, locks, dtype, activation, weights.experts, weights.hidden,
                        weights.intermediate, weights.first_expert, 0.0)
    t0 = time.perf_counter()
    _activate(state, torch.zeros(1, 2 * state.intermediate, dtype=dtype, device=locks.device))
    torch.cuda.synchronize(locks.device)
    state.compile_s = compile_s + time.perf_counter() - t0
    log.info("humming fused_moe E=%d H=%d I=%d %s %s: %d + %d kernels, compile %.2f s, prepare %.2f s",
             weights.experts, weights.hidden, weights.intermediate, dtype, activation, w13.kernels,
             w2.kernels, state.compile_s, time.perf_counter() - start)
    return state


def _activate(state: PreparedMoE, gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    from humming.forward import may_process_input

    out = out if out is not None else gate_up.new_empty(gate_up.shape[0], state.intermediate)
    result, _, _ = may_process_input(
        state.w2.converted.config, gate_up, outputs=out, activation_type="binary_split",
        activation_impl=ACTIVATION_IMPL[state.activation],
    )
    return result


def fused_moe(x: torch.Tensor, prepared: PreparedMoE, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              *, activation: str | None = None, quantize_activations: bool = False,
              variant: str | None = None) -> torch.Tensor:
    """The reference's fused-MoE contract (``backends/reference/moe.py``) on Humming's expert
    GEMMs: ``x[M, H]`` in the prepared dtype, ``topk_weights[M, k]`` (applied in fp32),
    ``topk_ids[M, k]`` global ids (non-local ones contribute zero) -> ``[M, H]`` in x.dtype."""
    _no_w4a4(quantize_activations)
    _check_x(x, prepared.hidden, prepared.dtype, "fused_moe")
    if activation is not None and activation != prepared.activation:
        raise NumericsError(
            f"humming fused_moe: prepared (and compiled) for {prepared.activation!r}, asked for {activation!r}"
        )
    if x.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise NumericsError(
            f"humming fused_moe needs x [M, H] and topk_weights, topk_ids [M, k]; found "
            f"{tuple(x.shape)}, {tuple(topk_weights.shape)}, {tuple(topk_ids.shape)}"
        )
    m, top_k = topk_ids.shape
    h, inter = prepared.hidden, prepared.intermediate
    out = torch.empty(m, h, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    pairs = m * top_k
    x = x.contiguous()
    topk_ids = topk_ids.contiguous()
    block13, block2 = prepared.w13.block_m(pairs), prepared.w2.block_m(pairs)
    r13 = indexed_routing(topk_ids, prepared.experts, prepared.first_expert, block13)
    r2 = r13 if block2 == block13 else indexed_routing(topk_ids, prepared.experts, prepared.first_expert, block2)
    gate_up = torch.empty(pairs, 2 * inter, dtype=x.dtype, device=x.device)
    prepared.w13.forward(x, prepared.locks, outputs=gate_up, sorted_ids=r13.sorted_ids,
                         expert_ids=r13.expert_ids, num_tokens_padded=r13.num_tokens_padded,
                         top_k=top_k, valid_shape_m=pairs)
    hidden = _activate(prepared, gate_up)
    down = torch.empty(pairs, h, dtype=x.dtype, device=x.device)
    prepared.w2.forward(hidden, prepared.locks, outputs=down, sorted_ids=r2.sorted_ids,
                        expert_ids=r2.expert_ids, num_tokens_padded=r2.num_tokens_padded,
                        top_k=1, valid_shape_m=pairs)
    return topk_sum(down[None], topk_ids, out, prepared.experts, prepared.first_expert, topk_weights)


__all__ = ["prepare_linear", "linear", "prepare_moe", "fused_moe", "PreparedLinear", "PreparedMoE",
           "ACTIVATION_IMPL", "tuning_ranges"]
