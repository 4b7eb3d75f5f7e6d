"""The data the oracle reasons about: the device, the layer problem, and each backend's rules.

Everything here is a frozen pydantic model: hashable (a :class:`Problem` keys the resolve
cache), comparable, and JSON-serializable.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, PositiveInt, field_validator, model_validator

from quantoracle.errors import DeviceError, ProblemError
from quantoracle.schemes.keys import QuantKey
from quantoracle.schemes.scheme import Scheme

LayerKind = Literal["linear", "moe"]
Platform = Literal["cpu", "cuda", "rocm"]
ActivationDtype = Literal["float32", "bfloat16", "float16"]
LAYER_KINDS: tuple[LayerKind, ...] = ("linear", "moe")
ACTIVATION_DTYPES: tuple[ActivationDtype, ...] = ("bfloat16", "float16", "float32")
ANY = "any"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Device(_Frozen):
    """Where a layer runs: a platform and, for CUDA, a compute capability.

    ``Device.parse("sm90")`` is an H100/H200, ``"sm100"`` a B200, ``"sm80"`` an A100, ``"cpu"`` the
    CPU; ``Device.current()`` probes torch.
    """

    platform: Platform
    capability: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _capability_for_cuda(self) -> "Device":
        if (self.platform == "cuda") != (self.capability is not None):
            raise ValueError("capability: a CUDA device has a compute capability, other platforms none")
        return self

    @classmethod
    def parse(cls, text: str) -> "Device":
        """``"cpu"``, ``"rocm"``, ``"sm90"`` / ``"sm_90"`` / ``"sm90a"``, ``"sm100"``, ``"sm120"``.
        Raises :class:`~quantoracle.errors.DeviceError` for anything else (``"sm00"``, ``None``)."""
        hint = "write 'cpu', 'rocm' or a CUDA compute capability like 'sm80', 'sm90', 'sm100'"
        if not isinstance(text, str):
            raise DeviceError(f"device {text!r} is not a string: {hint}")
        t = text.strip().lower()
        if t in ("cpu", "rocm"):
            return cls(platform=t)
        match = re.fullmatch(r"sm_?([1-9]\d?)(\d)a?", t)
        if not match:
            raise DeviceError(f"device {text!r}: {hint}")
        return cls(platform="cuda", capability=(int(match.group(1)), int(match.group(2))))

    @classmethod
    def of(cls, device: Any) -> "Device":
        """The Device of a ``torch.device`` (or its string form), probing CUDA if needed."""
        import torch

        device = torch.device(device)
        if device.type == "cuda":
            if torch.version.hip:
                return cls(platform="rocm")
            return cls(platform="cuda", capability=torch.cuda.get_device_capability(device))
        return cls(platform="cpu")

    @classmethod
    def current(cls) -> "Device":
        """The current CUDA device if there is one, else the CPU."""
        import torch

        return cls.of("cuda" if torch.cuda.is_available() else "cpu")

    def __str__(self) -> str:
        if self.capability is None:
            return self.platform
        return f"sm{self.capability[0]}{self.capability[1]}"


class ParallelConfig(_Frozen):
    """How a layer is sharded. Tensor parallelism splits a Linear's output (``tp_dim="column"``) or
    input (``"row"``) features, and each expert's intermediate dimension (gate/up by column,
    down by row); expert parallelism gives each rank ``experts / ep_size`` whole experts."""

    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    tp_dim: Literal["column", "row"] = "column"

    @model_validator(mode="after")
    def _ranks(self) -> "ParallelConfig":
        for what in ("tp", "ep"):
            size, rank = getattr(self, f"{what}_size"), getattr(self, f"{what}_rank")
            if size < 1:
                raise ProblemError(f"{what}_size={size}: a parallel size is at least 1")
            if not 0 <= rank < size:
                raise ProblemError(f"{what}_rank={rank} is out of range for {what}_size={size}: use 0..{size - 1}")
        return self

    @classmethod
    def for_rank(
        cls, rank: int, tp_size: int = 1, ep_size: int = 1, tp_dim: Literal["column", "row"] = "column"
    ) -> "ParallelConfig":
        """The config of ``rank`` in a group of ``tp_size * ep_size`` ranks, tensor-parallel
        ranks adjacent: ``rank = ep_rank * tp_size + tp_rank`` (see :attr:`group_rank`)."""
        if not 0 <= rank < tp_size * ep_size:
            raise ProblemError(f"rank={rank} is out of range for tp_size * ep_size = {tp_size * ep_size}")
        return cls(tp_size=tp_size, tp_rank=rank % tp_size, ep_size=ep_size, ep_rank=rank // tp_size, tp_dim=tp_dim)

    @property
    def group_size(self) -> int:
        return self.tp_size * self.ep_size

    @property
    def group_rank(self) -> int:
        """This shard's rank in its process group: ``ep_rank * tp_size + tp_rank``."""
        return self.ep_rank * self.tp_size + self.tp_rank

    def describe(self, kind: LayerKind = "linear") -> str:
        """``tp2(row) ep1``; the split dimension only where it means something (a sharded Linear)."""
        dim = f"({self.tp_dim})" if self.tp_size > 1 and kind == "linear" else ""
        return f"tp{self.tp_size}{dim} ep{self.ep_size}"

    def __str__(self) -> str:
        return self.describe()


class Problem(_Frozen):
    """One quantized layer to serve.

    - Linear: ``y[M, n] = x[M, k] @ W[n, k]^T``.
    - MoE: ``k`` is the hidden size H and ``n`` the intermediate size I of one expert
      (gate/up weights ``[2I, H]``, down ``[H, I]``), ``experts`` E and ``top_k``.

    Shapes are the unsharded (global) ones; ``local_n`` / ``local_k`` / ``local_experts`` are what
    one rank holds under ``parallel``.
    """

    kind: LayerKind
    scheme: Scheme
    device: Device
    dtype: ActivationDtype = "bfloat16"
    n: int
    k: int
    experts: int | None = None
    top_k: int | None = None
    moe_activation: str | None = None
    parallel: ParallelConfig = ParallelConfig()

    @field_validator("n", "k")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"{info.field_name}={v}: a layer dimension is positive")
        return v

    @model_validator(mode="before")
    @classmethod
    def _moe_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "moe" and data.get("moe_activation") is None:
            data = {**data, "moe_activation": "silu"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Problem":
        p = self.parallel
        if self.kind == "moe":
            if self.experts is None or self.top_k is None or self.experts < 1:
                raise ProblemError("a MoE problem needs experts >= 1 and top_k")
            if not 1 <= self.top_k <= self.experts:
                raise ProblemError(f"top_k={self.top_k} must be in 1..experts={self.experts}")
            if self.experts % p.ep_size:
                raise ProblemError(
                    f"experts={self.experts} is not divisible by ep_size={p.ep_size}: "
                    "each rank must hold the same number of whole experts"
                )
        else:
            if (self.experts, self.top_k, self.moe_activation) != (None, None, None) or p.ep_size != 1:
                raise ProblemError("a Linear problem has no experts, top_k, moe_activation or ep_size")
        dim = "n" if self.kind == "moe" or p.tp_dim == "column" else "k"
        split = getattr(self, dim)
        if split % p.tp_size:
            raise ProblemError(f"{dim}={split} is not divisible by tp_size={p.tp_size}")
        return self

    @property
    def local_n(self) -> int:
        if self.kind == "linear" and self.parallel.tp_dim == "row":
            return self.n
        return self.n // self.parallel.tp_size

    @property
    def local_k(self) -> int:
        """Input features of the shard; for MoE the hidden size (gate/up's K; down's K is local_n)."""
        if self.kind == "linear" and self.parallel.tp_dim == "row":
            return self.k // self.parallel.tp_size
        return self.k

    @property
    def reduction_dims(self) -> tuple[int, ...]:
        """Every K a kernel of this problem reduces over, per shard (for MoE: H for gate/up, I/tp
        for down)."""
        return (self.local_k, self.local_n) if self.kind == "moe" else (self.local_k,)

    @property
    def local_experts(self) -> int | None:
        return None if self.experts is None else self.experts // self.parallel.ep_size

    def with_scheme(self, scheme: Scheme) -> "Problem":
        return self.model_copy(update={"scheme": scheme})

    def __str__(self) -> str:
        shape = f"n={self.n} k={self.k}"
        if self.kind == "moe":
            shape = f"E={self.experts} top{self.top_k} H={self.k} I={self.n} {self.moe_activation}"
        return f"{self.kind} {self.scheme} on {self.device} {self.dtype} {shape} {self.parallel.describe(self.kind)}"


DEFAULT_TOLERANCE = 1e-2


class SchemeSupport(_Frozen):
    """One scheme a backend serves. ``activation`` may be a key, ``None`` (weight-only) or
    ``"any"``. ``emulated`` marks W4A4 served by exact emulation (activations quantized and
    dequantized in 16-bit arithmetic); it is chosen only under ``activation_fallback="emulate"``.
    ``tolerance``: the relative error ``||y - y_ref|| / ||y_ref||`` (Frobenius) the backend
    promises against the ``reference`` backend on the same weights and inputs, at bf16; ``None``
    means :data:`DEFAULT_TOLERANCE`. The numerics check on first use holds it to that."""

    weight: QuantKey
    activation: QuantKey | None | Literal["any"] = None
    emulated: bool = False
    tolerance: float | None = None

    def matches(self, scheme: Scheme) -> bool:
        return self.weight == scheme.weight and self.activation in (ANY, scheme.activation)


_CAPABILITY = re.compile(r"sm_?([1-9]\d?)(\d)a?")


def _capability(text: str) -> tuple[int, int]:
    match = _CAPABILITY.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"capability {text!r}: write it like 'sm80' or 'sm100'")
    return int(match.group(1)), int(match.group(2))


def format_capability(cap: tuple[int, int]) -> str:
    return f"sm{cap[0]}{cap[1]}"


class CapabilityRange(_Frozen):
    """Compute capabilities ``low..high`` inclusive (``high=None``: no upper bound). Written
    ``"sm90"`` (exactly one), ``"sm80+"`` (sm80 or newer) or ``"sm100-sm103"`` (a family)."""

    low: tuple[int, int]
    high: tuple[int, int] | None

    @classmethod
    def parse(cls, text: str) -> "CapabilityRange":
        t = text.strip().lower()
        if t.endswith("+"):
            return cls(low=_capability(t[:-1]), high=None)
        low, _, high = t.partition("-")
        return cls(low=_capability(low), high=_capability(high or low))

    def contains(self, cap: tuple[int, int]) -> bool:
        return self.low <= cap and (self.high is None or cap <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{format_capability(self.low)} or newer"
        if self.high == self.low:
            return format_capability(self.low)
        return f"{format_capability(self.low)} to {format_capability(self.high)}"


def describe_capabilities(ranges: tuple[CapabilityRange, ...]) -> str:
    """``"sm80 or newer"``, ``"sm100 to sm101, sm120"``; ``"any"`` for no rule."""
    return ", ".join(map(str, ranges)) or "any"


def _token_range(low: int, high: int | None) -> str:
    return f"{low} or more" if high is None else f"{low}..{high}"


class Variant(_Frozen):
    """A named internal path of a backend (e.g. a fused kernel and a dequantize-then-GEMM path).

    Each variant is its own candidate for the engine, labelled ``backend/variant`` and judged by
    the ordinary rules against the backend's spec with the fields set here replacing the
    backend's (a field left ``None`` inherits it; :data:`VARIANT_FIELDS`): e.g. a kernel written
    for one architecture sets ``platforms={"cuda"}`` and ``capabilities="sm90"`` (capabilities
    constrain CUDA devices only), one with stricter tiles ``n_multiple_of``.
    ``layout`` names the weight layout the variant's ``prepare`` makes: variants (and backends)
    with one layout share one prepared copy."""

    name: str
    description: str = ""
    layer_kinds: frozenset[LayerKind] | None = None
    schemes: tuple[SchemeSupport, ...] | None = None
    dtypes: frozenset[ActivationDtype] | None = None
    platforms: frozenset[Platform] | None = None
    capabilities: tuple[CapabilityRange, ...] | None = None
    n_multiple_of: PositiveInt | None = None
    k_multiple_of: PositiveInt | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    layout: str | None = None
    priority: int | None = None

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: str) -> str:
        return _snake_case("variant name", v)

    @field_validator("capabilities", mode="before")
    @classmethod
    def _parse_capabilities(cls, v: Any) -> Any:
        return None if v is None else capability_ranges(v)


VARIANT_FIELDS = ("layer_kinds", "schemes", "dtypes", "platforms", "capabilities", "n_multiple_of",
                  "k_multiple_of", "min_tokens", "max_tokens", "layout", "priority")
"""The :class:`BackendSpec` fields a :class:`Variant` may set in place of its backend's."""


def capability_ranges(v: Any) -> Any:
    """``"sm90"``, ``("sm80+", "sm120")`` or ranges -> a tuple of :class:`CapabilityRange`
    (anything else is left for pydantic to reject with the field's name)."""
    if isinstance(v, str):
        v = (v,)
    if not isinstance(v, (tuple, list, set, frozenset)):
        return v
    return tuple(CapabilityRange.parse(x) if isinstance(x, str) else x for x in v)


def _snake_case(what: str, v: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", v):
        raise ValueError(f"{what} {v!r}: use lower_snake_case, it is typed on command lines")
    return v


class BackendSpec(_Frozen):
    """A backend's declaration: which problems it serves, as data the engine evaluates.

    Every field is one rule (or a few); ``priority`` ranks the backends that pass them all
    (higher first, then by name) where no measurement ranks them (see :mod:`.tuning`).

    - ``capabilities``: the CUDA compute capabilities served, a set of ranges written
      ``"sm80+"``, ``"sm90"``, ``"sm100-sm103"``; empty means any. ``min_capability`` /
      ``max_capability`` (tuples) are accepted as a shorthand for one range.
    - ``n_multiple_of`` / ``k_multiple_of``: per-shard multiples of the output and reduction
      dimensions. For MoE, ``k`` is the hidden size (gate/up's K) and the intermediate size is
      both gate/up's N and down's K, so it must be a multiple of both.
    - ``min_tokens`` / ``max_tokens``: the token counts M (rows of ``x``) served, hard limits
      only (``None``: no upper limit).
    - ``layout``: the name of the weight layout ``prepare`` makes (``None``: the backend's name).
    - ``variants``: named internal paths, each its own candidate (:class:`Variant`).
    - ``dtype_capabilities``: per activation dtype, the capabilities it needs beyond
      ``capabilities`` (e.g. ``{"bfloat16": "sm80+"}`` for a backend that runs fp16 on sm75 but
      bf16 only from Ampere); a dtype not named needs nothing more.
    - ``install``: what to run when a ``requires`` module is missing.
    """

    name: str
    description: str = ""
    layer_kinds: frozenset[LayerKind]
    schemes: tuple[SchemeSupport, ...]
    platforms: frozenset[Platform]
    capabilities: tuple[CapabilityRange, ...] = ()
    dtypes: frozenset[ActivationDtype] = frozenset(ACTIVATION_DTYPES)
    dtype_capabilities: tuple[tuple[ActivationDtype, tuple[CapabilityRange, ...]], ...] = ()
    moe_activations: frozenset[str] = frozenset({"silu"})
    n_multiple_of: PositiveInt = 1
    k_multiple_of: PositiveInt = 1
    max_top_k: int | None = None
    tensor_parallel: bool = True
    expert_parallel: bool = True
    min_tokens: int = 1
    max_tokens: int | None = None
    layout: str | None = None
    variants: tuple[Variant, ...] = ()
    requires: tuple[str, ...] = ()
    install: str | None = None
    priority: int = 0

    @model_validator(mode="before")
    @classmethod
    def _capability_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("min_capability" in data or "max_capability" in data):
            data = dict(data)
            low, high = data.pop("min_capability", None), data.pop("max_capability", None)
            if low is not None or high is not None:
                if data.get("capabilities"):
                    raise ValueError("capabilities: give either capabilities or min/max_capability")
                data["capabilities"] = (CapabilityRange(low=tuple(low or (1, 0)),
                                                        high=None if high is None else tuple(high)),)
        return data

    @field_validator("capabilities", mode="before")
    @classmethod
    def _parse_capabilities(cls, v: Any) -> Any:
        return capability_ranges(v)

    @field_validator("dtype_capabilities", mode="before")
    @classmethod
    def _parse_dtype_capabilities(cls, v: Any) -> Any:
        items = v.items() if isinstance(v, dict) else v
        return tuple((dtype, capability_ranges(ranges)) for dtype, ranges in items)

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: str) -> str:
        return _snake_case("name", v)

    @model_validator(mode="after")
    def _consistent(self) -> "BackendSpec":
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: names must be unique, got {names}")
        for low, high, where in [(self.min_tokens, self.max_tokens, "")] + [
            (v.min_tokens or 1, v.max_tokens, f"variant {v.name}: ") for v in self.variants
        ]:
            if low < 1 or (high is not None and high < low):
                raise ValueError(f"{where}token range {_token_range(low, high)}: need 1 <= min_tokens <= max_tokens")
        return self

    @property
    def layout_name(self) -> str:
        return self.layout or self.name

    @property
    def token_range(self) -> str:
        return _token_range(self.min_tokens, self.max_tokens)

    def for_variant(self, variant: Variant) -> "BackendSpec":
        """This spec with ``variant``'s fields in place of the backend's (its layout inherits the
        backend's layout name, not the variant's name)."""
        update = {f: getattr(variant, f) for f in VARIANT_FIELDS if getattr(variant, f) is not None}
        update.setdefault("layout", self.layout_name)
        update["variants"] = ()
        return self.model_copy(update=update)


@runtime_checkable
class Backend(Protocol):
    """What a plugin registers: a spec, and the two calls a layer makes.

    - ``prepare(weights, problem)`` runs once per layer: it converts the checkpoint's tensors
      (:class:`~quantoracle.schemes.tensors.NVFP4Tensor` for a Linear,
      :class:`~quantoracle.schemes.tensors.MoEWeights` for MoE) to the backend's layout.
      ``problem`` is the *effective* problem (after any activation fallback).
    - ``apply(prepared, x, topk_weights=None, topk_ids=None, *, variant=None)`` runs every
      forward. Linear: ``x[..., K] -> [..., N]``. MoE: ``x[M, H]``, ``topk_weights[M, k]``,
      ``topk_ids[M, k]`` (global expert ids; experts that are not local contribute zero)
      ``-> [M, H]``. ``variant`` names one of ``spec.variants`` (the plan's choice for this
      call's token count); ``None`` for a backend without variants.

    One ``prepare`` result serves every variant of the same layout.
    """

    spec: BackendSpec

    def prepare(self, weights: Any, problem: Problem) -> Any: ...

    def apply(self, prepared: Any, x: Any, topk_weights: Any = None, topk_ids: Any = None, *,
              variant: str | None = None) -> Any: ...
