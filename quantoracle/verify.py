"""The numerics check on first use: a prepared layer's backend against ``reference``.

When a layer is prepared on a backend other than ``reference``, :func:`check_layer` runs a small probe
batch through each bucket of its plan and through the reference backend on the same device and
compares them with the tolerance the backend declares for the scheme
(:attr:`~quantoracle.oracle.spec.SchemeSupport.tolerance`). Output NaN/Inf on finite input is
always a failure. The probe is small on purpose:

- token counts: :data:`PROBE_TOKENS` (decode, a small batch that is no multiple of 16, a
  prefill-sized batch) and the first token count of every plan bucket (the cheapest count that
  bucket serves), so every bucket is probed at least once; a kernel wrong only at counts no
  probe lands on is not caught (the quarantine is the answer to what is found later);
- values: standard normal in the layer's activation dtype, fixed seed;
- Linear: the reference dequantizes only :data:`PROBE_ROWS` output rows per row shard (the
  backend's full output is computed; only those columns are compared);
- MoE: tokens are routed round-robin over :data:`PROBE_EXPERTS` spread experts, top-k distinct
  experts per token, and the reference dequantizes only the experts routed to (one at a time);
- nothing is kept after the check (no 16-bit copy of the weights).

Policies (``verify=`` on layers, ``load_nvfp4``, ``quantize_model``; ``$QUANTORACLE_VERIFY``;
``--verify`` on the CLI): ``"off"``; ``"first_use"`` (a failing candidate is quarantined for
this problem for the rest of the process, the layer re-plans and is prepared again, and the
failure is recorded in :attr:`Check` and in the new plan's ``quarantined`` rejection);
``"strict"`` (a failure raises :class:`~quantoracle.errors.NumericsCheckError`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from quantoracle.errors import NumericsCheckError, OptionError
from quantoracle.oracle.engine import Resolution, candidates
from quantoracle.oracle.quarantine import QuarantineEntry
from quantoracle.oracle.registry import default_registry
from quantoracle.oracle.spec import DEFAULT_TOLERANCE
from quantoracle.schemes.tensors import MoEWeights, NVFP4Tensor

VerifyPolicy = Literal["off", "first_use", "strict"]
VERIFY_POLICIES: tuple[VerifyPolicy, ...] = ("off", "first_use", "strict")
ENV_VERIFY = "QUANTORACLE_VERIFY"
DEFAULT_POLICY: VerifyPolicy = "first_use"
PROBE_TOKENS = (1, 17, 128)
PROBE_ROWS = 128
PROBE_EXPERTS = 8
SEED = 1234


def policy(value: str | None) -> VerifyPolicy:
    """``value``, else ``$QUANTORACLE_VERIFY``, else :data:`DEFAULT_POLICY`; checked."""
    chosen = value if value is not None else os.environ.get(ENV_VERIFY) or DEFAULT_POLICY
    if chosen not in VERIFY_POLICIES:
        source = "verify=" if value is not None else f"${ENV_VERIFY}="
        raise OptionError(f"{source}{chosen!r}: use one of {', '.join(VERIFY_POLICIES)}")
    return chosen


@dataclass(frozen=True)
class Check:
    """One probe of one candidate: ``label`` at ``tokens`` tokens, the relative error found
    against ``reference``, the ``tolerance`` declared, whether it ``passed``, the seconds the
    check took (both runs and the comparison), and ``replaced_by`` after a failure (the label
    that serves instead, ``None`` under ``"strict"``)."""

    label: str
    tokens: int
    error: float
    tolerance: float
    passed: bool
    seconds: float
    replaced_by: str | None = None

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        error = "NaN/Inf" if not math.isfinite(self.error) else f"{self.error:.2e}"
        text = f"{self.label} at M={self.tokens}: rel. error {error} (tolerance {self.tolerance:.0e}) {verdict}"
        return text + (f", replaced by {self.replaced_by}" if self.replaced_by else "")


def tolerance(resolution: Resolution, registry: Any) -> float:
    """What the chosen candidate declares for the served scheme (the default when nothing)."""
    spec = candidates(registry, resolution.problem.kind)[resolution.label].spec
    declared = [s.tolerance for s in spec.schemes if s.matches(resolution.scheme) and s.tolerance is not None]
    return min(declared) if declared else DEFAULT_TOLERANCE


def probe_tokens(starts: list[int]) -> list[int]:
    """:data:`PROBE_TOKENS` and each bucket's first token count ``starts``, sorted, without repeats."""
    return sorted({*PROBE_TOKENS, *starts})


def check_layer(layer: Any, weights: Any) -> tuple[Check, ...]:
    """Probe ``layer`` (an :class:`~quantoracle.layers.NVFP4Linear` or
    :class:`~quantoracle.layers.NVFP4FusedMoE`, whatever its ``verify`` policy) at every count of
    :func:`probe_tokens` for its plan, against ``reference``; ``weights`` are the
    :class:`NVFP4Tensor` / :class:`MoEWeights` it was built from (the layer keeps only the
    backend's prepared form). Returns one :class:`Check` per probe served by another backend,
    in token order, failures included (nothing is quarantined or raised here: the policy is the
    caller's); empty when ``reference`` serves every bucket (nothing to compare)."""
    registry = layer._options.get("registry") or default_registry()
    checks = []
    for tokens in probe_tokens([b.min_tokens for b in layer.plan.buckets]):
        res, prepared = layer._serve(tokens)
        if res.name != "reference":
            checks.append(check(res, prepared, weights, tokens, layer.dtype, registry))
    return tuple(checks)


def check(resolution: Resolution, prepared: Any, weights: Any, tokens: int, dtype: torch.dtype,
          registry: Any) -> Check:
    """One probe (:func:`run_probe`) of ``resolution``'s candidate, whose ``prepared`` state was
    made from ``weights``, at ``tokens`` tokens in ``dtype``, judged by the tolerance it declares;
    used by :func:`check_layer` and by ``quantoracle tune`` (which measures no candidate that
    fails it)."""
    device = weights.down.packed.device if isinstance(weights, MoEWeights) else weights.packed.device
    limit = tolerance(resolution, registry)
    error, seconds = timed(run_probe, resolution, prepared, weights, tokens, device, dtype)
    return Check(resolution.label, tokens, error, limit, error <= limit, seconds)


def run_probe(resolution: Resolution, prepared: Any, weights: Any, tokens: int, device: torch.device,
              dtype: torch.dtype) -> float:
    """Relative error (Frobenius) of ``resolution``'s backend against ``reference`` on a probe
    batch of ``tokens`` tokens; ``inf`` when the backend's output is not finite."""
    from quantoracle.backends.reference.linear import linear as reference_linear
    from quantoracle.backends.reference.moe import fused_moe as reference_moe

    problem = resolution.effective_problem
    quantize = not problem.scheme.weight_only
    generator = torch.Generator(device="cpu").manual_seed(SEED + tokens)
    if problem.kind == "linear":
        k = weights.cols
        x = torch.randn(tokens, k, generator=generator).to(device=device, dtype=dtype)
        y = resolution.backend.apply(prepared, x, variant=resolution.variant)
        rows, columns = _probe_rows(weights)
        expected = reference_linear(x, rows, quantize_activations=quantize).float()
        got = y[:, columns].float()
    else:
        x = torch.randn(tokens, weights.hidden, generator=generator).to(device=device, dtype=dtype)
        ids, topk_weights = _probe_routing(tokens, problem.top_k, weights, device)
        y = resolution.backend.apply(prepared, x, topk_weights, ids, variant=resolution.variant)
        expected = reference_moe(x, weights, topk_weights, ids, activation=problem.moe_activation,
                                 quantize_activations=quantize).float()
        got = y.float()
    if not torch.isfinite(got).all():
        return math.inf
    scale = expected.norm().clamp_min(1e-30)
    return float((got - expected).norm() / scale)


def _probe_rows(weight: NVFP4Tensor) -> tuple[NVFP4Tensor, torch.Tensor]:
    """The first :data:`PROBE_ROWS` rows of each row shard as a tensor of the same shards, and
    their column indices in the full output."""
    per_shard = weight.rows // weight.shards
    take = min(PROBE_ROWS, per_shard)
    columns = torch.cat([torch.arange(s * per_shard, s * per_shard + take) for s in range(weight.shards)])
    index = columns.to(weight.packed.device)
    rows = NVFP4Tensor(weight.packed[index], weight.block_scale[index], weight.global_scale, weight.input_scale)
    return rows, columns.to(weight.packed.device)


def _probe_routing(tokens: int, top_k: int, weights: MoEWeights, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token t goes to ``top_k`` distinct local experts among :data:`PROBE_EXPERTS` spread over
    the layer, round robin; router weights are a fixed softmax-like profile."""
    local = weights.experts
    spread = torch.linspace(0, local - 1, steps=min(PROBE_EXPERTS, local)).round().long().unique()
    if spread.numel() < top_k:
        spread = torch.arange(local)
    picks = [(t + j) % spread.numel() for t in range(tokens) for j in range(top_k)]
    ids = spread[torch.tensor(picks)].reshape(tokens, top_k) + weights.first_expert
    w = torch.softmax(-torch.arange(top_k, dtype=torch.float32), dim=0).expand(tokens, top_k)
    return ids.to(device), w.contiguous().to(device)


def quarantine_entry(resolution: Resolution, check: Check) -> QuarantineEntry:
    """The run-time quarantine entry for a failed check: this candidate, this GPU and problem
    shape, every batch size (a kernel wrong at one M is not trusted at the others). The scheme is
    the one served (after an activation fallback), which is what the re-plan judges the
    candidate against."""
    p = resolution.effective_problem
    fp = resolution.fingerprint
    return QuarantineEntry(
        backend=resolution.name, variant=resolution.variant,
        capabilities=(str(p.device),) if p.device.capability else (),
        gpu_name=fp.gpu_name if fp else None,
        schemes=(p.scheme.name,), kinds=(p.kind,), dtypes=(p.dtype,),
        n=p.n, k=p.k, experts=p.experts, top_k=p.top_k,
        reason=check.describe(),
        source="the numerics check on first use",
    )


def failure_error(check: Check, resolution: Resolution) -> NumericsCheckError:
    return NumericsCheckError(
        f"numerics check: {check.describe()} for {resolution.problem}; the backend "
        f"disagrees with the exact reference. Exclude it (exclude=[{resolution.label!r}] or --exclude), or "
        "use verify='first_use' to quarantine it and serve the layer with the next candidate"
    )


def timed(fn, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start
