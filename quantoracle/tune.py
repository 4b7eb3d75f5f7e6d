"""``quantoracle tune``: time every surviving candidate of each layer shape at a ladder of token
counts on this GPU and write a tuning cache (:mod:`quantoracle.oracle.tuning`) that plans rank by.

For each problem (its served scheme: a W4A4 checkpoint under the weight-only fallback is timed
weight-only), the candidates are the survivors of ``resolve(problem, tokens=M,
layouts="fastest", tuning="none")`` at each ladder M, minus ``reference`` (never fast; it stays
unmeasured, so it ranks after every measured candidate). Each candidate's layout is prepared
once on random NVFP4 weights of the problem's shape and timed with :mod:`quantoracle.timing`:
rotating inputs, and rotating weight copies (dense) or routings (MoE) where one copy would stay
in L2. Compilation (Triton, Humming's NVRTC) happens in the first, untimed warm-up of each
(candidate, M); its seconds are reported per candidate.

Nothing wrong is ranked: before a candidate is timed at an M, it is probed at that M against
``reference`` on the same weights (:func:`quantoracle.verify.check`, the numerics check layers
run on first use) and held to the tolerance it declares. A candidate that fails at any M is
reported and measured at none for that problem (a kernel wrong at one batch size is not
trusted at the others), so the cache never ranks it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from quantoracle.errors import DeviceError
from quantoracle.oracle import Problem, resolve
from quantoracle.oracle.engine import fingerprint_for
from quantoracle.oracle.registry import Registry, default_registry
from quantoracle.oracle.tuning import LADDER, Measurement, TuningCache
from quantoracle.timing import graph_time_us, random_moe, random_nvfp4
from quantoracle.verify import Check, check

SKIPPED = ("reference",)


@dataclass
class TuneReport:
    """What a tune run did: the cache, seconds spent preparing (and compiling) per candidate,
    the numerics checks run (one per candidate and M timed, plus the failing one), and the
    (problem, candidate, M, error) of calls or checks that failed (left unmeasured)."""

    cache: TuningCache
    prepare_s: dict[str, float] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def tune(
    problems: Sequence[Problem],
    *,
    ladder: Sequence[int] = LADDER,
    registry: Registry | None = None,
    match: str = "exact",
    command: str = "",
    progress: bool = True,
    target_s: float = 0.1,
) -> TuneReport:
    """Measure ``problems`` (all on this machine's GPU) at every M of ``ladder``.

    Raises :class:`~quantoracle.errors.DeviceError` without a CUDA GPU or for a problem whose
    device is not this GPU's compute capability."""
    if not torch.cuda.is_available():
        raise DeviceError("quantoracle tune needs a CUDA GPU: torch sees none")
    registry = registry or default_registry()
    here = torch.cuda.get_device_capability()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    measurements: list[Measurement] = []
    report = TuneReport(cache=None)  # type: ignore[arg-type]
    bar = _progress(len(problems) * len(ladder), progress)
    for problem in problems:
        if problem.device.capability != here:
            raise DeviceError(f"tune: problem {problem} is for {problem.device}, this GPU is sm{here[0]}{here[1]}")
        measurements += _tune_problem(problem, ladder, registry, target_s, report, bar, l2)
    bar.close()
    fp = fingerprint_for(problems[0].device, registry) if problems else None
    report.cache = TuningCache(fingerprint=fp, match=match, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               command=command, measurements=tuple(measurements))
    return report


def _tune_problem(problem: Problem, ladder: Sequence[int], registry: Registry, target_s: float,
                  report: TuneReport, bar, l2: int, device: str = "cuda") -> list[Measurement]:
    served = {m: resolve(problem, tokens=m, layouts="fastest", tuning="none", registry=registry) for m in ladder}
    effective = next(iter(served.values())).effective_problem
    labels = sorted({label for res in served.values() for label in res.survivors if label.split("/")[0] not in SKIPPED})
    weights = random_weights(effective, device)
    dtype = getattr(torch, effective.dtype)
    copies = 1
    if effective.kind == "linear":
        copies = max(2, min(16, math.ceil(4 * l2 / max(weights.nbytes, 1))))
    states: dict[tuple, list] = {}
    out: list[Measurement] = []
    wrong: set[str] = set()
    for m in ladder:
        res_m = served[m]
        for label in labels:
            if label not in res_m.survivors or label in wrong:
                continue
            backend, _, variant = label.partition("/")
            candidate = registry.backends[backend]
            spec = candidate.spec if not variant else candidate.spec.for_variant(
                next(v for v in candidate.spec.variants if v.name == variant))
            key = (backend, spec.layout_name)
            try:
                if key not in states:
                    start = time.perf_counter()
                    states[key] = [candidate.prepare(w, effective) for w in _copies(weights, copies)]
                    if device == "cuda":
                        torch.cuda.synchronize()
                    report.prepare_s[label] = round(time.perf_counter() - start, 2)
                forced = resolve(problem, tokens=m, force=label, layouts="fastest", tuning="none", registry=registry)
                probe = check(forced, states[key][0], weights, m, dtype, registry)
                report.checks.append(probe)
                if not probe.passed:
                    wrong.add(label)
                    out = [row for row in out if row.candidate != label]
                    report.failures.append(f"{effective} {label}: numerics: {probe.describe()}; not measured "
                                           "at any M (the cache does not rank it)")
                    continue
                us = _time(candidate, states[key], effective, m, variant or None, l2, target_s)
            except Exception as err:  # a failing candidate is reported and left unmeasured
                report.failures.append(f"{effective} {label} M={m}: {type(err).__name__}: {str(err)[:300]}")
                continue
            out.append(Measurement(kind=effective.kind, scheme=effective.scheme.name, dtype=effective.dtype,
                                   n=effective.n, k=effective.k, experts=effective.experts, top_k=effective.top_k,
                                   tokens=m, candidate=label, us=round(us, 2)))
        bar.update(1)
    return out


def random_weights(problem: Problem, device: str = "cuda"):
    """Random NVFP4 weights of ``problem``'s per-rank shape (a Linear's ``NVFP4Tensor`` or the
    local experts' ``MoEWeights``), seeded by the shape: what ``tune`` times."""
    if problem.kind == "linear":
        return random_nvfp4((), problem.local_n, problem.local_k, 1, seed=problem.n + problem.k, device=device)
    e, h, i = problem.local_experts, problem.k, problem.local_n
    return random_moe(e, h, i, seeds=(11 + e + h, 12 + e + i), device=device)


def _copies(weights, copies: int) -> list:
    if copies == 1:
        return [weights]
    return [weights] + [type(weights)(*(t.clone() for t in (weights.packed, weights.block_scale, weights.global_scale)))
                        for _ in range(copies - 1)]


def _time(backend, states: list, problem: Problem, m: int, variant: str | None, l2: int, target_s: float) -> float:
    dtype = getattr(torch, problem.dtype)
    gen = torch.Generator(device="cuda").manual_seed(m)
    if problem.kind == "linear":
        xs = [torch.randn(m, problem.local_k, device="cuda", dtype=dtype, generator=gen) for _ in states]
        calls = [lambda x=x, s=s: backend.apply(s, x, variant=variant) for x, s in zip(xs, states)]
    else:
        e, k = problem.local_experts, problem.top_k
        touched = min(e, m * k) * 3 * problem.k * problem.local_n * 4.5 / 8
        rotations = max(2, min(32, math.ceil(4 * l2 / touched)))
        calls = []
        for _ in range(rotations):
            x = torch.randn(m, problem.k, device="cuda", dtype=dtype, generator=gen)
            ids = torch.rand(m, e, device="cuda", generator=gen).topk(k, dim=-1).indices
            w = torch.softmax(torch.randn(m, k, device="cuda", generator=gen), dim=-1)
            calls.append(lambda x=x, w=w, ids=ids: backend.apply(states[0], x, w, ids, variant=variant))
    return graph_time_us(calls, target_s=target_s, max_reps=30)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="tune", unit="M", file=sys.stderr)
