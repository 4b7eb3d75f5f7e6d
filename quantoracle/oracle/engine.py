"""``resolve``: evaluate every rule of every backend for a problem, rank the survivors, apply the
activation-fallback policy and overrides, and explain the outcome."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from quantoracle.errors import QuantoracleError
from quantoracle.oracle.registry import Registry, default_registry
from quantoracle.oracle.rules import Context, RuleFailure, describe_activation, evaluate
from quantoracle.oracle.spec import Backend, Problem
from quantoracle.schemes.scheme import Scheme

ActivationFallback = Literal["weight_only", "emulate", "error"]
FALLBACKS: tuple[ActivationFallback, ...] = ("weight_only", "emulate", "error")
ENV_BACKEND = "QUANTORACLE_BACKEND"

Rejections = Mapping[str, tuple[RuleFailure, ...]]
Force = str | Mapping[str, str] | None


def force_for_layer(force: Force, layer: str) -> str | None:
    """The backend ``force`` names for ``layer``: ``force`` itself when it is a name, else the
    value of the first layer-name glob (fnmatch) that matches; ``None`` (resolve as usual) when
    no glob matches, so a model-wide override never aborts on a layer it does not name."""
    if force is None or isinstance(force, str):
        return force
    return next((backend for glob, backend in force.items() if fnmatchcase(layer, glob)), None)


@dataclass(frozen=True)
class Resolution:
    """The outcome of :func:`resolve`.

    - ``backend``: the chosen backend object; ``name`` its name.
    - ``scheme``: the scheme it runs: the problem's, or its weight-only form after a
      ``"weight_only"`` fallback.
    - ``survivors``: every backend that passed all rules, best first (``survivors[0] == name``).
    - ``rejections``: for every other backend, each failed rule, against the effective problem.
    - ``fallback``: ``None``, ``"weight_only"`` or ``"emulate"``; then ``asked_rejections`` holds
      why no backend served the problem as asked, and ``note`` says what was done.
    """

    problem: Problem
    backend: Backend
    scheme: Scheme
    survivors: tuple[str, ...]
    rejections: Rejections
    fallback: Literal["weight_only", "emulate"] | None = None
    asked_rejections: Rejections = field(default_factory=dict)
    forced: bool = False
    note: str = ""

    @property
    def name(self) -> str:
        return self.backend.spec.name

    @property
    def effective_problem(self) -> Problem:
        """The problem the backend actually serves (``prepare`` receives this)."""
        return self.problem.with_scheme(self.scheme)

    def explain(self) -> str:
        """A table: the choice, the policy taken, and every rejected backend with its reasons."""
        lines = [f"problem : {self.problem}", f"chosen  : {self.name}" + (" (forced)" if self.forced else "")]
        if self.fallback:
            lines.append(f"fallback: {self.fallback}: {self.note}")
        if len(self.survivors) > 1:
            lines.append(f"ranked  : {' > '.join(self.survivors)}")
        lines += _rejection_table(self.rejections)
        if self.fallback:
            lines.append("as asked (before the fallback):")
            lines += _rejection_table(self.asked_rejections)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (``quantoracle resolve --json``)."""
        return {
            "problem": self.problem.model_dump(mode="json"),
            "scheme": self.scheme.name,
            "backend": self.name,
            "forced": self.forced,
            "fallback": self.fallback,
            "note": self.note,
            "survivors": list(self.survivors),
            "rejections": _rejections_json(self.rejections),
            "asked_rejections": _rejections_json(self.asked_rejections),
        }


def _rejection_table(rejections: Rejections) -> list[str]:
    if not rejections:
        return []
    width = max(len(name) for name in rejections)
    lines = []
    for name, failures in rejections.items():
        for i, failure in enumerate(failures):
            lines.append(f"  {name if i == 0 else '':<{width}}  x {failure}")
    return lines


def _rejections_json(rejections: Rejections) -> dict[str, list[dict[str, str]]]:
    return {name: [f.model_dump() for f in failures] for name, failures in rejections.items()}


class NoBackendError(QuantoracleError):
    """No backend can serve the problem; ``rejections`` holds every backend's failed rules."""

    def __init__(self, problem: Problem, rejections: Rejections, hint: str) -> None:
        self.problem = problem
        self.rejections = dict(rejections)
        lines = [f"no backend can serve {problem}", *_rejection_table(rejections), hint]
        super().__init__("\n".join(line for line in lines if line))


class ForcedBackendError(NoBackendError):
    """A backend named by ``force`` (or ``QUANTORACLE_BACKEND``) cannot serve the problem. There
    is no silent fallback to another backend."""


class UnknownBackendError(QuantoracleError, KeyError):
    """``force`` or ``exclude`` names a backend that no plugin declares."""

    def __str__(self) -> str:
        return str(self.args[0])


def resolve(
    problem: Problem,
    *,
    force: str | None = None,
    exclude: Iterable[str] = (),
    activation_fallback: ActivationFallback = "weight_only",
    registry: Registry | None = None,
) -> Resolution:
    """Choose the backend for ``problem`` and say why every other one was rejected.

    Every rule of every backend is evaluated. Survivors rank by priority, then name.
    ``force`` (default: the ``QUANTORACLE_BACKEND`` environment variable) picks one backend; if
    it fails a rule, :class:`ForcedBackendError` lists why. ``exclude`` removes backends.

    ``activation_fallback`` applies when the scheme has quantized activations and no backend
    serves them natively: ``"weight_only"`` serves the weights with 16-bit activations,
    ``"emulate"`` picks a backend that emulates the activation quantization exactly, ``"error"``
    refuses. The :class:`Resolution` records which was taken.

    Raises :class:`NoBackendError` (or its subclass :class:`ForcedBackendError`) when nothing
    fits, and :class:`UnknownBackendError` for a name no plugin declares. Results are cached per
    (problem, force, exclude, policy, registry state).
    """
    if activation_fallback not in FALLBACKS:
        raise ValueError(f"activation_fallback={activation_fallback!r}: use one of {', '.join(FALLBACKS)}")
    registry = registry or default_registry()
    force = force if force is not None else (os.environ.get(ENV_BACKEND) or None)
    outcome = _resolve(registry, registry.generation, problem, force, frozenset(exclude), activation_fallback)
    if isinstance(outcome, QuantoracleError):
        raise outcome.with_traceback(None)
    return outcome


@lru_cache(maxsize=4096)
def _resolve(
    registry: Registry,
    generation: int,
    problem: Problem,
    force: str | None,
    exclude: frozenset[str],
    policy: ActivationFallback,
) -> Resolution | QuantoracleError:
    """The cached outcome: a Resolution, or the error resolve raises (failures are cached too)."""
    try:
        return _decide(registry, problem, force, exclude, policy)
    except (NoBackendError, UnknownBackendError) as err:
        return err


def _decide(
    registry: Registry, problem: Problem, force: str | None, exclude: frozenset[str], policy: ActivationFallback
) -> Resolution:
    backends = registry.backends
    unknown = sorted((({force} - {None}) | exclude) - backends.keys())
    if unknown:
        raise UnknownBackendError(
            f"unknown backend {', '.join(map(repr, unknown))}; registered: {', '.join(backends)}"
        )
    candidates = {name: b for name, b in backends.items() if name not in exclude}
    if force is not None:
        candidates = {force: backends[force]}

    asked = _evaluate(candidates, problem, Context())
    stages: list[tuple[str | None, Problem, Context]] = [(None, problem, Context())]
    if problem.scheme.activation is not None and policy != "error":
        if policy == "weight_only":
            stages.append(("weight_only", problem.with_scheme(problem.scheme.as_weight_only()), Context()))
        else:
            stages.append(("emulate", problem, Context(allow_emulation=True)))

    for fallback, effective, ctx in stages:
        verdicts = asked if fallback is None else _evaluate(candidates, effective, ctx)
        survivors = sorted(
            (name for name, failures in verdicts.items() if not failures),
            key=lambda name: (-candidates[name].spec.priority, name),
        )
        if survivors:
            return Resolution(
                problem=problem,
                backend=candidates[survivors[0]],
                scheme=effective.scheme,
                survivors=tuple(survivors),
                rejections={n: f for n, f in verdicts.items() if f},
                fallback=fallback,
                asked_rejections={n: f for n, f in asked.items() if f} if fallback else {},
                forced=force is not None,
                note=_note(fallback, problem),
            )

    if force is not None:
        raise ForcedBackendError(
            problem, asked,
            f"the forced backend {force!r} (force= or ${ENV_BACKEND}) cannot serve this layer; "
            "quantoracle does not fall back silently: force another backend, or none",
        )
    excluded = f" (excluded: {', '.join(sorted(exclude))})" if exclude else ""
    hint = f"no registered backend{excluded} passes every rule; "
    if problem.scheme.activation is not None and policy == "error":
        hint += "activation_fallback='weight_only' or 'emulate' would relax the activation rule; "
    hint += "install a plugin that serves this case, or change the device, dtype or sharding"
    raise NoBackendError(problem, asked, hint)


def _evaluate(candidates: Mapping[str, Backend], problem: Problem, ctx: Context) -> dict[str, tuple[RuleFailure, ...]]:
    return {name: evaluate(b.spec, problem, ctx) for name, b in candidates.items()}


def _note(fallback: str | None, problem: Problem) -> str:
    if fallback == "weight_only":
        return (f"no backend runs activation key {describe_activation(problem.scheme.activation)} "
                "natively here; serving the weights with 16-bit activations (the checkpoint's "
                "input_scale is unused; outputs differ from W4A4 numerics)")
    if fallback == "emulate":
        return "no native W4A4 kernel here; emulating the activation quantization exactly"
    return ""
