"""The rules: one function per rule, each comparing one field of a :class:`BackendSpec` with the
:class:`Problem`. A rule returns ``None`` when it passes, or a :class:`RuleFailure` that says what
was found, what the backend accepts, and a sentence for the user. All rules always run."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from pydantic import BaseModel, ConfigDict

from quantoracle.oracle.quarantine import QuarantineEntry
from quantoracle.oracle.spec import ANY, BackendSpec, Problem, SchemeSupport, describe_capabilities
from quantoracle.schemes.keys import KEY_NAMES, QuantKey


class RuleFailure(BaseModel):
    """Why one backend cannot serve a problem, for one rule. ``code`` is stable (scripts may
    match on it); ``message`` is for people."""

    model_config = ConfigDict(frozen=True)

    code: str
    found: str
    accepted: str
    message: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


@dataclass(frozen=True)
class Context:
    """What a rule needs besides spec and problem.

    - ``allow_emulation``: emulated W4A4 may be chosen (``activation_fallback="emulate"``).
    - ``tokens``: the token count M asked about; ``None`` asks for a candidate that serves every M.
    - ``variant``: the candidate's variant name (``None``: the backend itself).
    - ``layouts``: the weight layouts the layout policy allows (``None``: any).
    - ``quarantine``: the entries in force; ``gpu_name`` and ``version`` (the backend's
      distribution version) are what their predicates read.
    """

    allow_emulation: bool = False
    tokens: int | None = None
    variant: str | None = None
    layouts: frozenset[str] | None = None
    quarantine: tuple[QuarantineEntry, ...] = ()
    gpu_name: str | None = None
    version: str | None = None


Rule = Callable[[BackendSpec, Problem, Context], "RuleFailure | None"]


def describe_activation(act: QuantKey | None | str) -> str:
    if act is None:
        return "None (16-bit activations, weight-only)"
    if act == ANY:
        return "any activation"
    return describe_key(act)


def describe_key(key: QuantKey) -> str:
    """The key's name in :mod:`quantoracle.schemes.keys` if it has one, else its full form."""
    return KEY_NAMES.get(key) or str(key)


def _fail(code: str, found: object, accepted: object, message: str) -> RuleFailure:
    return RuleFailure(code=code, found=str(found), accepted=str(accepted), message=message)


def _join(values) -> str:
    return ", ".join(sorted(str(v) for v in values)) or "nothing"


def layer_kind(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    if p.kind not in spec.layer_kinds:
        return _fail("layer_kind", p.kind, _join(spec.layer_kinds),
                     f"layer kind {p.kind}: this backend serves {_join(spec.layer_kinds)} layers")
    return None


def weight_scheme(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    if not any(s.weight == p.scheme.weight for s in spec.schemes):
        accepted = _join({describe_key(s.weight) for s in spec.schemes})
        return _fail("weight_scheme", describe_key(p.scheme.weight), accepted,
                     f"weight key {describe_key(p.scheme.weight)}: this backend needs {accepted}")
    return None


def _activation_accepted(s: SchemeSupport, ctx: Context) -> str:
    text = describe_activation(s.activation)
    return f"{text} by emulation" if s.emulated else text


def activation_scheme(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    same_weight = [s for s in spec.schemes if s.weight == p.scheme.weight]
    if not same_weight:
        return None  # weight_scheme already says why
    matching = [s for s in same_weight if s.matches(p.scheme)]
    if any(not s.emulated or ctx.allow_emulation for s in matching):
        return None
    found = describe_activation(p.scheme.activation)
    if matching:
        return _fail("activation_scheme", found, "emulation, allowed by the activation fallback 'emulate'",
                     f"activation key {found}: this backend only emulates it (exact numerics, "
                     "16-bit arithmetic); the activation fallback 'emulate' allows that")
    accepted = " or ".join(sorted({_activation_accepted(s, ctx) for s in same_weight}))
    kind = "W4A4" if all(s.activation is not None for s in same_weight) else "these"
    return _fail("activation_scheme", found, accepted,
                 f"activation key {found}: this backend needs {accepted} ({kind} activations)")


def platform(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    if p.device.platform not in spec.platforms:
        return _fail("platform", p.device.platform, _join(spec.platforms),
                     f"platform {p.device.platform}: this backend runs on {_join(spec.platforms)}")
    return None


def capability(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    cap = p.device.capability
    if cap is None or not spec.capabilities or any(r.contains(cap) for r in spec.capabilities):
        return None
    accepted = describe_capabilities(spec.capabilities)
    return _fail("capability", p.device, accepted, f"compute capability {p.device}: this backend needs {accepted}")


def dtype(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    if p.dtype not in spec.dtypes:
        return _fail("dtype", p.dtype, _join(spec.dtypes),
                     f"activation dtype {p.dtype}: this backend computes in {_join(spec.dtypes)}")
    needs = dict(spec.dtype_capabilities).get(p.dtype)
    cap = p.device.capability
    if needs and cap is not None and not any(r.contains(cap) for r in needs):
        accepted = describe_capabilities(needs)
        return _fail("dtype", f"{p.dtype} on {p.device}", f"{p.dtype} on {accepted}",
                     f"activation dtype {p.dtype} on compute capability {p.device}: this backend "
                     f"computes in {p.dtype} on {accepted} only")
    return None


def moe_activation(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    if p.kind == "moe" and p.moe_activation not in spec.moe_activations:
        return _fail("moe_activation", p.moe_activation, _join(spec.moe_activations),
                     f"MoE activation {p.moe_activation}: this backend fuses {_join(spec.moe_activations)}")
    return None


def block_alignment(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    """Each reduction dimension (after sharding) must hold whole scale groups, whatever the
    backend: for NVFP4 one fp8 scale per 16 elements of K."""
    keys = [p.scheme.weight] + ([p.scheme.activation] if p.scheme.activation else [])
    group = max((key.scale.group.cols for key in keys if key.scale and key.scale.group.cols > 0), default=1)
    bad = [k for k in p.reduction_dims if k % group]
    if bad:
        return _fail("block_alignment", bad[0], f"multiple of {group}",
                     f"reduction dimension {bad[0]} (per shard, {p.parallel.describe(p.kind)}) is not a multiple of the "
                     f"scheme's scale group {group}: one scale covers {group} elements; choose a "
                     f"tensor-parallel size that keeps K/tp a multiple of {group}")
    return None


def shape(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    dims = {"n": (p.local_n, spec.n_multiple_of), "k": (p.local_k, spec.k_multiple_of)}
    if p.kind == "moe":  # down's K is the intermediate shard
        dims["n"] = (p.local_n, math.lcm(spec.n_multiple_of, spec.k_multiple_of))
    bad = [(d, v, m) for d, (v, m) in dims.items() if v % m]
    if bad:
        text = "; ".join(f"{d}={v} (per shard) is not a multiple of {m}" for d, v, m in bad)
        return _fail("shape", ", ".join(f"{d}={v}" for d, v, _ in bad),
                     ", ".join(f"{d} multiple of {m}" for d, _, m in bad), f"shape: {text}")
    return None


def top_k(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    if p.kind == "moe" and spec.max_top_k is not None and p.top_k > spec.max_top_k:
        return _fail("top_k", p.top_k, f"<= {spec.max_top_k}",
                     f"top_k={p.top_k}: this backend routes at most {spec.max_top_k} experts per token")
    return None


def tensor_parallel(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    if p.parallel.tp_size > 1 and not spec.tensor_parallel:
        return _fail("tensor_parallel", f"tp_size={p.parallel.tp_size}", "tp_size=1",
                     "tensor parallelism: this backend serves unsharded layers only")
    return None


def expert_parallel(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    if p.parallel.ep_size > 1 and not spec.expert_parallel:
        return _fail("expert_parallel", f"ep_size={p.parallel.ep_size}", "ep_size=1",
                     "expert parallelism: this backend needs all experts on one rank")
    return None


@cache
def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def requires(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    missing = [m for m in spec.requires if not _importable(m)]
    if missing:
        how = spec.install or f"pip install {' '.join(missing)}"
        return _fail("requires", f"missing {', '.join(missing)}", ", ".join(spec.requires),
                     f"needs the Python module(s) {', '.join(missing)}: {how}")
    return None


def tokens(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    """The token count M against the declared range; with no M asked, the candidate must serve
    every M (``resolve(problem)`` answers for any batch size; ``plan`` splits by M)."""
    low, high = spec.min_tokens, spec.max_tokens
    if ctx.tokens is None:
        if low == 1 and high is None:
            return None
        return _fail("tokens", "any token count", spec.token_range,
                     f"serves {spec.token_range} tokens only: resolve with tokens=M, or use plan()")
    if ctx.tokens < low or (high is not None and ctx.tokens > high):
        return _fail("tokens", ctx.tokens, spec.token_range,
                     f"{ctx.tokens} tokens: this path serves {spec.token_range} tokens")
    return None


def layout(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    if ctx.layouts is not None and spec.layout_name not in ctx.layouts:
        allowed = _join(ctx.layouts)
        return _fail("layout", spec.layout_name, allowed,
                     f"weight layout {spec.layout_name}: this layer holds one copy of its weights, in "
                     f"layout {allowed} (layouts='fastest' allows one copy per layout)")
    return None


def quarantined(spec: BackendSpec, p: Problem, ctx: Context) -> RuleFailure | None:
    hits = [e for e in ctx.quarantine if e.matches(spec.name, ctx.variant, p, ctx.tokens, ctx.gpu_name, ctx.version)]
    if hits:
        e = hits[0]
        link = f" ({e.link})" if e.link else ""
        return _fail("quarantined", e.describe(), "no quarantine entry",
                     f"quarantined by {e.source}: {e.reason}{link}; allowing quarantined backends "
                     "(allow_quarantined=True, --allow-quarantined) uses it anyway")
    return None


RULES: tuple[Rule, ...] = (
    layer_kind, weight_scheme, activation_scheme, platform, capability, dtype, moe_activation,
    block_alignment, shape, top_k, tensor_parallel, expert_parallel, requires, tokens, layout, quarantined,
)


def evaluate(spec: BackendSpec, problem: Problem, ctx: Context) -> tuple[RuleFailure, ...]:
    """Every failed rule of ``spec`` for ``problem``; empty when the backend can serve it."""
    return tuple(f for rule in RULES if (f := rule(spec, problem, ctx)) is not None)
