"""``plan``: which candidate serves each batch size of a layer, as contiguous token buckets.

A :class:`Plan` covers token counts 1..infinity with buckets that neither overlap nor leave
gaps; each holds the :class:`~quantoracle.oracle.engine.Resolution` that serves it. The
buckets are found by resolving once per stretch of token counts over which nothing can change
(the candidates' declared token ranges, quarantine token ranges, and the tuning cache's ladder:
each ladder point decides the counts nearest to it in log scale), then joining neighbours that
run the same candidate. So ``plan(p).at(M)`` is ``resolve(p, tokens=M)`` for every M.

Weight memory is a policy: every distinct layout in a plan is one prepared copy of the weights.
``layouts="one"`` (the default) keeps one: of the plans restricted to a single layout, the
fastest by the measurements (the sum over buckets of log(cost / best cost at that M)), ties
going to the layout that serves one token best; candidates of other layouts are rejected with
rule ``layout``. ``layouts="fastest"`` lets every bucket take its best candidate.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from quantoracle.errors import OptionError, QuantoracleError
from quantoracle.oracle.engine import (
    LAYOUT_POLICIES,
    ActivationFallback,
    Environment,
    LayoutPolicy,
    NoBackendError,
    Resolution,
    UnknownBackendError,
    _options,
    _problem,
    _resolve,
    candidates,
    environment,
    provenance,
)
from quantoracle.oracle.fingerprint import fingerprint
from quantoracle.oracle.registry import Registry, default_registry
from quantoracle.oracle.spec import Problem
from quantoracle.oracle.tuning import Tuning


@dataclass(frozen=True)
class Bucket:
    """Token counts ``min_tokens..max_tokens`` (``None``: no end) and what serves them."""

    min_tokens: int
    max_tokens: int | None
    resolution: Resolution

    def covers(self, tokens: int) -> bool:
        return self.min_tokens <= tokens and (self.max_tokens is None or tokens <= self.max_tokens)

    @property
    def range(self) -> str:
        if self.max_tokens is None:
            return f"{self.min_tokens}+"
        return str(self.min_tokens) if self.max_tokens == self.min_tokens else f"{self.min_tokens}-{self.max_tokens}"

    def decided_by(self) -> str:
        res = self.resolution
        if res.forced:
            return f"forced by {res.forced_by}"
        if res.decided_by:
            return res.decided_by.describe()
        return f"priority {res.priorities[res.label]}"

    def to_dict(self) -> dict[str, Any]:
        res = self.resolution
        return {"min_tokens": self.min_tokens, "max_tokens": self.max_tokens, "backend": res.name,
                "variant": res.variant, "layout": res.layout, "scheme": res.scheme.name,
                "fallback": res.fallback, "decided_by": self.decided_by()}


@dataclass(frozen=True)
class Plan:
    """A layer's dispatch by token count. ``buckets`` cover 1..infinity in order; ``layouts``
    are the weight layouts it needs (one prepared copy each) under ``policy``."""

    problem: Problem
    buckets: tuple[Bucket, ...]
    policy: LayoutPolicy
    resolver: Callable[[int], Resolution] = field(repr=False, compare=False)

    def at(self, tokens: int) -> Resolution:
        """The resolution at exactly ``tokens`` tokens (``resolve(problem, tokens=tokens)`` with
        the plan's options): the bucket's choice, with the rules evaluated at that count."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise OptionError(f"tokens={tokens!r}: a token count is an integer >= 1")
        bucket = next(b for b in self.buckets if b.covers(tokens))
        return bucket.resolution if tokens == bucket.min_tokens else self.resolver(tokens)

    @property
    def layouts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.resolution.layout for b in self.buckets))

    @property
    def first(self) -> Resolution:
        return self.buckets[0].resolution

    def __repr__(self) -> str:
        parts = ", ".join(f"{b.range}: {b.resolution.label}" for b in self.buckets)
        return f"<Plan {parts}; explain() says why>"

    def explain(self) -> str:
        """The buckets, then the first bucket's full explanation (the rules are the same in
        every bucket except ``tokens``, ``layout`` and the ranking)."""
        lines = [f"plan    : {self.problem} (layouts={self.policy}: {', '.join(self.layouts)})"]
        width = max(len(b.range) for b in self.buckets)
        for b in self.buckets:
            lines.append(f"  M {b.range:<{width}}  {b.resolution.label:<28} {b.decided_by()}")
        fp = self.first.fingerprint
        if fp is not None:
            lines.append(f"env     : {fp.describe()}")
        lines.append("first bucket:")
        lines += ["  " + line for line in self.first.explain().splitlines()]
        return "\n".join(lines)

    def to_list(self) -> list[dict[str, Any]]:
        return [b.to_dict() for b in self.buckets]

    def to_dict(self) -> dict[str, Any]:
        first = self.first
        return {"problem": self.problem.model_dump(mode="json"), "layouts": list(self.layouts),
                "policy": self.policy, "plan": self.to_list(),
                "fingerprint": None if first.fingerprint is None else first.fingerprint.model_dump(mode="json"),
                "tuning_notes": list(first.notes), "quarantine_sources": list(first.quarantine_sources)}


def plan(
    problem: Problem,
    *,
    force: str | None = None,
    exclude: Iterable[str] = (),
    activation_fallback: ActivationFallback = "weight_only",
    layouts: LayoutPolicy = "one",
    quarantine: str | os.PathLike[str] | None = None,
    tuning: str | os.PathLike[str] | None = None,
    allow_quarantined: bool = False,
    registry: Registry | None = None,
) -> Plan:
    """The per-batch-size dispatch for ``problem`` (options as in
    :func:`~quantoracle.oracle.engine.resolve`). ``force`` pins every bucket to one backend (its
    variants may still split by M); a forced backend that cannot serve some M is a
    :class:`~quantoracle.oracle.engine.ForcedBackendError` naming that M, never a switch.
    Raises :class:`~quantoracle.oracle.engine.NoBackendError` when some token count has no
    candidate (under ``layouts="one"``: when no single layout serves every token count)."""
    problem = _problem(problem)
    force, forced_by, exclude = _options(force, exclude, activation_fallback, None)
    if layouts not in LAYOUT_POLICIES:
        raise OptionError(f"layouts={layouts!r}: use one of {', '.join(LAYOUT_POLICIES)}")
    registry = registry or default_registry()
    env = environment(quarantine, tuning, allow_quarantined)
    outcome = _plan(registry, registry.generation, problem, force, forced_by, exclude, activation_fallback, layouts, env)
    if isinstance(outcome, QuantoracleError):
        raise outcome.with_traceback(None)
    return outcome


@lru_cache(maxsize=4096)
def _plan(registry: Registry, generation: int, problem: Problem, force: str | None, forced_by: str | None,
          exclude: frozenset[str], policy: ActivationFallback, layouts: LayoutPolicy,
          env: Environment) -> Plan | QuantoracleError:
    starts = _breakpoints(registry, problem, env)

    def at(tokens: int, allowed: frozenset[str] | None) -> Resolution:
        res = _resolve(registry, generation, problem, tokens, force, forced_by, exclude, policy, allowed, env)
        if isinstance(res, QuantoracleError):
            raise res
        return res

    def segments(allowed: frozenset[str] | None) -> list[Resolution]:
        return [at(start, allowed) for start in starts]

    try:
        free = segments(None)
        chosen, allowed = free, None
        if layouts == "one" and len({r.layout for r in free}) > 1:
            chosen = _one_layout(free, segments, registry, problem)
            allowed = frozenset({chosen[0].layout})
    except (NoBackendError, UnknownBackendError) as err:
        return err
    return Plan(problem, _join(starts, chosen), layouts, lambda tokens: at(tokens, allowed))


def _one_layout(free: list[Resolution], segments, registry: Registry, problem: Problem) -> list[Resolution]:
    """The fastest plan that holds one layout (see the module docstring)."""
    options: list[tuple[float, int, str, list[Resolution]]] = []
    layout_of = {label: c.spec.layout_name for label, c in candidates(registry, problem.kind).items()}
    survivors = {layout_of.get(label, label) for r in free for label in r.survivors}
    names = dict.fromkeys([free[0].layout] + sorted(survivors))
    for rank, layout in enumerate(names):
        try:
            restricted = segments(frozenset({layout}))
        except NoBackendError:
            continue
        options.append((_slowdown(restricted, free), rank, layout, restricted))
    if not options:
        # no single layout serves every token count: report the first gap, rule `layout` included
        return segments(frozenset({free[0].layout}))
    return min(options, key=lambda o: o[:3])[3]


UNMEASURED_SLOWDOWN = math.log(1e3)
"""What a bucket served by an unmeasured candidate costs a layout where the unconstrained choice
was measured: as much as being 1000x slower (unknown is never preferred to measured)."""


def _slowdown(restricted: list[Resolution], free: list[Resolution]) -> float:
    total = 0.0
    for mine, best in zip(restricted, free):
        if mine.label == best.label:
            continue
        costs = best.decided_by.costs if best.decided_by else {}
        if mine.label in costs and best.label in costs:
            total += math.log(costs[mine.label] / costs[best.label])
        elif best.label in costs:
            total += UNMEASURED_SLOWDOWN
        else:
            total += 1e-6  # nothing measured: prefer the layouts the unconstrained choice uses
    return total


def _breakpoints(registry: Registry, problem: Problem, env: Environment) -> list[int]:
    """Every token count where some answer can change, sorted, starting at 1."""
    points = {1}
    for c in candidates(registry, problem.kind).values():
        points.add(c.spec.min_tokens)
        if c.spec.max_tokens is not None:
            points.add(c.spec.max_tokens + 1)
    for entry in env.quarantine:
        points.update(entry.token_bounds)
    packages, _, distributions = provenance(registry)
    usable, _ = env.tuning.applicable(fingerprint(problem.device, packages), distributions)
    for effective in {problem, problem.with_scheme(problem.scheme.as_weight_only())}:
        points.update(Tuning.breakpoints(usable, effective))
    return sorted(points)


def _join(starts: list[int], resolutions: list[Resolution]) -> tuple[Bucket, ...]:
    buckets: list[Bucket] = []
    for i, (start, res) in enumerate(zip(starts, resolutions)):
        end = starts[i + 1] - 1 if i + 1 < len(starts) else None
        if buckets and buckets[-1].resolution.choice == res.choice:
            buckets[-1] = Bucket(buckets[-1].min_tokens, end, buckets[-1].resolution)
        else:
            buckets.append(Bucket(start, end, res))
    return tuple(buckets)
