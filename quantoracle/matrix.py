"""The scheme x layer-kind matrix on one device: which backend serves each, or why none does."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

from quantoracle.oracle import Device, NoBackendError, Problem, Registry, default_registry, resolve
from quantoracle.oracle.engine import ActivationFallback, _resolve
from quantoracle.oracle.rules import RuleFailure
from quantoracle.oracle.spec import LAYER_KINDS, ActivationDtype
from quantoracle.schemes.scheme import SCHEMES

# Representative shapes: a 4096-wide Linear and a Qwen3-30B-A3B-like MoE layer.
SHAPES: dict[str, dict[str, Any]] = {
    "linear": dict(n=4096, k=4096),
    "moe": dict(n=768, k=2048, experts=128, top_k=8),
}


def problems(device: Device, dtype: ActivationDtype = "bfloat16") -> list[Problem]:
    """Every named scheme x layer kind, at the representative shapes."""
    return [
        Problem(kind=kind, scheme=scheme, device=device, dtype=dtype, **SHAPES[kind])
        for scheme in SCHEMES.values()
        for kind in LAYER_KINDS
    ]


def matrix(
    device: Device,
    dtype: ActivationDtype = "bfloat16",
    activation_fallback: ActivationFallback = "weight_only",
    registry: Registry | None = None,
    tokens: int | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """One row per problem at ``tokens`` tokens (``None``: any batch size; ``options`` as for
    :func:`quantoracle.resolve`): ``scheme`` and ``kind``, the chosen ``backend`` (or None) and
    its ``variant``, the
    ``fallback`` taken and the ``served_scheme``, and the failed rule codes per backend: ``asked_rejections`` against the
    problem as asked (every backend's reasons when none serves it, or why a fallback was
    needed), ``rejections`` against the problem served (empty when none is served)."""
    rows = []
    for problem in problems(device, dtype):
        row: dict[str, Any] = {"scheme": problem.scheme.name, "kind": problem.kind}
        try:
            res = resolve(problem, activation_fallback=activation_fallback, registry=registry, tokens=tokens, **options)
        except NoBackendError as err:
            row.update(backend=None, variant=None, fallback=None, served_scheme=None, asked_rejections=_codes(err.rejections), rejections={})
        else:
            row.update(backend=res.name, variant=res.variant, fallback=res.fallback, served_scheme=res.scheme.name, asked_rejections=_codes(res.asked_rejections),
                       rejections=_codes(res.rejections))
        rows.append(row)
    return rows


def _codes(rejections: Mapping[str, Sequence[RuleFailure]]) -> dict[str, list[str]]:
    return {name: [f.code for f in failures] for name, failures in rejections.items()}


BENCH_DEVICES = ("cpu", "sm80", "sm90", "sm100")


def time_resolve(rounds: int = 5, registry: Registry | None = None) -> dict[str, Any]:
    """Median microseconds per resolve over the full matrix (every named scheme x layer kind x
    device in :data:`BENCH_DEVICES` x activation dtype x fallback policy): ``cold`` with an
    empty cache (rules evaluated), ``cached`` for the same problem again. A resolve that
    raises :class:`NoBackendError` counts like any other."""
    registry = registry or default_registry()
    registry.backends  # plugin loading is start-up, not resolve
    grid = [
        (problem, policy)
        for device in BENCH_DEVICES
        for dtype in ("bfloat16", "float16", "float32")
        for problem in problems(Device.parse(device), dtype)
        for policy in ("weight_only", "emulate", "error")
    ]
    cold: list[float] = []
    cached: list[float] = []
    for _ in range(rounds):
        _resolve.cache_clear()
        for samples in (cold, cached):
            for problem, policy in grid:
                start = time.perf_counter()
                try:
                    resolve(problem, activation_fallback=policy, registry=registry)
                except NoBackendError:
                    pass
                samples.append(time.perf_counter() - start)
    micro = lambda xs: statistics.median(xs) * 1e6  # noqa: E731
    return {
        "problems": len(grid),
        "backends": len(registry.backends),
        "rounds": rounds,
        "cold_us_median": micro(cold),
        "cached_us_median": micro(cached),
        "cold_us_p90": statistics.quantiles(cold, n=10)[-1] * 1e6,
        "cached_us_p90": statistics.quantiles(cached, n=10)[-1] * 1e6,
    }
