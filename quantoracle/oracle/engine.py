"""``resolve``: evaluate every rule of every candidate (a backend, or one of its variants) for a
problem at a token count, rank the survivors (by measurement, else priority), apply the
activation-fallback policy and overrides, and explain the outcome. :mod:`.plan` builds the
per-batch-size dispatch on top of it."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any, Literal, NamedTuple

from pydantic import ValidationError

from quantoracle.errors import OptionError, ProblemError, QuantoracleError
from quantoracle.oracle import quarantine as quarantine_module
from quantoracle.oracle.fingerprint import SOFTWARE, Fingerprint, fingerprint, version_of
from quantoracle.oracle.quarantine import ENV_QUARANTINE, SHIPPED, QuarantineEntry, load_entries
from quantoracle.oracle.registry import Registry, default_registry
from quantoracle.oracle.rules import Context, RuleFailure, describe_activation, evaluate
from quantoracle.oracle.spec import LAYER_KINDS, Backend, BackendSpec, Problem
from quantoracle.oracle.tuning import Decision, Tuning, cache_key, load_tuning
from quantoracle.schemes.scheme import Scheme

ActivationFallback = Literal["weight_only", "emulate", "error"]
FALLBACKS: tuple[ActivationFallback, ...] = ("weight_only", "emulate", "error")
LayoutPolicy = Literal["one", "fastest"]
LAYOUT_POLICIES: tuple[LayoutPolicy, ...] = ("one", "fastest")
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
class Candidate:
    """One thing the engine can choose: a backend, or one variant of it (``label`` is
    ``backend/variant``), judged against ``spec`` (the backend's, with the variant's fields)."""

    label: str
    backend: Backend
    variant: str | None
    spec: BackendSpec


@dataclass(frozen=True)
class Resolution:
    """The outcome of :func:`resolve` for one problem at one token count (or any, ``tokens=None``).

    - ``backend``: the chosen backend object; ``name`` its name, ``variant`` the variant (or
      ``None``), ``label`` both (``backend/variant``), ``layout`` the weight layout it prepares.
    - ``scheme``: the scheme it runs: the problem's, or its weight-only form after a
      ``"weight_only"`` fallback.
    - ``survivors``: every candidate label that passed all rules, best first.
    - ``rejections``: for every other candidate, each failed rule, against the effective problem.
    - ``fallback``: ``None``, ``"weight_only"`` or ``"emulate"``; then ``asked_rejections`` holds
      why no candidate served the problem as asked, and ``note`` says what was done and which
      rule stopped the native path.
    - ``ranking``: ``"measured"`` when ``decided_by`` (a tuning-cache measurement) ranked the
      survivors, else ``"priority"``; ``priorities`` per survivor.
    - ``fingerprint``: the environment the answer was made in; ``notes``: tuning caches not used
      and why; ``quarantine_sources``: where the quarantine entries in force came from.
    - ``forced_by``: ``"force"`` or ``"$QUANTORACLE_BACKEND"`` when a backend was forced.
    """

    problem: Problem
    backend: Backend
    scheme: Scheme
    survivors: tuple[str, ...]
    rejections: Rejections
    fallback: Literal["weight_only", "emulate"] | None = None
    asked_rejections: Rejections = field(default_factory=dict)
    forced_by: str | None = None
    note: str = ""
    variant: str | None = None
    layout: str = ""
    tokens: int | None = None
    ranking: Literal["measured", "priority"] = "priority"
    decided_by: Decision | None = None
    priorities: Mapping[str, int] = field(default_factory=dict)
    fingerprint: Fingerprint | None = None
    notes: tuple[str, ...] = ()
    quarantine_sources: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.backend.spec.name

    @property
    def label(self) -> str:
        return self.name if self.variant is None else f"{self.name}/{self.variant}"

    @property
    def forced(self) -> bool:
        return self.forced_by is not None

    @property
    def choice(self) -> tuple:
        """What a layer runs: (label, layout, served scheme name, fallback)."""
        return (self.label, self.layout, self.scheme.name, self.fallback)

    @property
    def effective_problem(self) -> Problem:
        """The problem the backend actually serves (``prepare`` receives this)."""
        return self.problem.with_scheme(self.scheme)

    def __repr__(self) -> str:
        tokens = "any M" if self.tokens is None else f"M={self.tokens}"
        return f"<Resolution {self.label} for {self.problem} at {tokens}; explain() says why>"

    __str__ = __repr__

    def ranked(self) -> str:
        """The survivors best first, each with what ranked it."""
        if self.ranking == "measured":
            costs = self.decided_by.costs
            return " > ".join(f"{s} ({costs[s]:.1f} µs)" if s in costs else f"{s} (unmeasured, priority {self.priorities[s]})"
                              for s in self.survivors)
        return " > ".join(f"{s} (priority {self.priorities[s]})" for s in self.survivors)

    def explain(self) -> str:
        """A table: the choice, the policy taken, and every rejected candidate with its reasons
        (as asked first, when a fallback was taken)."""
        tokens = "any token count" if self.tokens is None else f"{self.tokens} tokens"
        lines = [f"problem : {self.problem}, {tokens}",
                 f"chosen  : {self.label} (layout {self.layout})" + (f" (forced by {self.forced_by})" if self.forced else "")]
        if self.fallback:
            lines.append(f"fallback: {self.fallback}: {self.note}")
            lines.append("as asked (before the fallback):")
            lines += _rejection_table(self.asked_rejections)
            lines.append(f"served as {self.scheme}:")
        lines.append(f"ranked  : {self.ranked()}")
        if self.decided_by:
            lines.append(f"decided : {self.decided_by.describe()}")
        lines += [f"note    : {n}" for n in self.notes]
        lines += _rejection_table(self.rejections)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (``quantoracle resolve --json``)."""
        return {
            "problem": self.problem.model_dump(mode="json"),
            "checkpoint_scheme": self.problem.scheme.name,
            "scheme": self.scheme.name,
            "backend": self.name,
            "variant": self.variant,
            "layout": self.layout,
            "tokens": self.tokens,
            "forced": self.forced,
            "forced_by": self.forced_by,
            "fallback": self.fallback,
            "note": self.note,
            "survivors": list(self.survivors),
            "ranking": self.ranking,
            "priorities": dict(self.priorities),
            "decided_by": None if self.decided_by is None else {
                "source": self.decided_by.source, "shape": self.decided_by.shape,
                "tokens": self.decided_by.tokens, "us": dict(self.decided_by.costs)},
            "asked_rejections": _rejections_json(self.asked_rejections),
            "rejections": _rejections_json(self.rejections),
            "fingerprint": None if self.fingerprint is None else self.fingerprint.model_dump(mode="json"),
            "notes": list(self.notes),
            "quarantine_sources": list(self.quarantine_sources),
        }


def _rejection_table(rejections: Rejections) -> list[str]:
    """One line per failed rule; the variants of one backend that fail the same rules are
    shown once, under the backend's name."""
    grouped: dict[str, tuple[RuleFailure, ...]] = {}
    by_backend: dict[str, list[str]] = {}
    for label in rejections:
        by_backend.setdefault(label.split("/")[0], []).append(label)
    for backend, labels in by_backend.items():
        failures = {rejections[label] for label in labels}
        if len(labels) > 1 and len(failures) == 1:
            grouped[backend] = rejections[labels[0]]
        else:
            grouped.update({label: rejections[label] for label in labels})
    if not grouped:
        return []
    width = max(len(name) for name in grouped)
    return [f"  {name if i == 0 else '':<{width}}  x {failure}"
            for name, failures in grouped.items() for i, failure in enumerate(failures)]


def _rejections_json(rejections: Rejections) -> dict[str, list[dict[str, str]]]:
    return {name: [f.model_dump() for f in failures] for name, failures in rejections.items()}


class NoBackendError(QuantoracleError):
    """No candidate can serve the problem; ``rejections`` holds every candidate's failed rules,
    ``hint`` what could be changed (in words; the CLI adds its flags)."""

    def __init__(self, problem: Problem, rejections: Rejections, hint: str, tokens: int | None = None) -> None:
        self.problem = problem
        self.rejections = dict(rejections)
        self.hint = hint
        self.tokens = tokens
        at = "" if tokens is None else f" at {tokens} tokens"
        lines = [f"no backend can serve {problem}{at}", *_rejection_table(rejections), hint]
        super().__init__("\n".join(line for line in lines if line))


class ForcedBackendError(NoBackendError):
    """A backend named by ``force`` (or ``QUANTORACLE_BACKEND``) cannot serve the problem. There
    is no silent fallback to another backend."""


class UnknownBackendError(QuantoracleError, KeyError):
    """``force`` or ``exclude`` names a backend (or variant) that no plugin declares."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(eq=False)
class Environment:
    """What an answer consults besides problem and options: quarantine entries (shipped, user
    file, run time) and tuning caches. Identity-hashed; built once per set of inputs."""

    quarantine: tuple[QuarantineEntry, ...]
    quarantine_sources: tuple[str, ...]
    tuning: Tuning


def environment(quarantine: str | os.PathLike[str] | None = None, tuning: str | os.PathLike[str] | None = None,
                allow_quarantined: bool = False) -> Environment:
    """The environment for these options (``quarantine=`` path else ``$QUANTORACLE_QUARANTINE``;
    ``tuning=`` see :func:`~quantoracle.oracle.tuning.load_tuning`), re-read when a file changes."""
    user = quarantine or os.environ.get(ENV_QUARANTINE) or None
    generation, runtime = quarantine_module.runtime_state()
    return _environment(str(user) if user else None, _mtime(user), generation, runtime, allow_quarantined,
                        cache_key(tuning), str(tuning) if tuning else None)


def _mtime(path: Any) -> int | None:
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


@lru_cache(maxsize=32)
def _environment(user: str | None, mtime: int | None, generation: int, runtime: tuple, allow: bool,
                 tuning_key: tuple, tuning: str | None) -> Environment:
    entries: tuple[QuarantineEntry, ...] = ()
    sources: list[str] = []
    if not allow:
        entries = load_entries(SHIPPED, source="shipped quarantine")
        sources.append("shipped")
        if user:
            entries += load_entries(user)
            sources.append(user)
        if runtime:
            entries += runtime
            sources.append("run time")
    return Environment(entries, tuple(sources), load_tuning(tuning))


def _problem(problem: Any) -> Problem:
    if isinstance(problem, Problem):
        return problem
    if isinstance(problem, Mapping):
        try:
            return Problem.model_validate(problem)
        except ValidationError as err:
            e = err.errors()[0]
            raise ProblemError(f"problem field {'.'.join(map(str, e['loc'])) or '(problem)'}: {e['msg']}") from None
    raise ProblemError(f"problem must be a Problem (or a dict of its fields), not {type(problem).__name__}")


def _options(force: Any, exclude: Any, activation_fallback: Any, tokens: Any) -> tuple[str | None, str | None, frozenset[str]]:
    """Validated (force, where it came from, exclude)."""
    if activation_fallback not in FALLBACKS:
        raise OptionError(f"activation_fallback={activation_fallback!r}: use one of {', '.join(FALLBACKS)}")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise OptionError(f"tokens={tokens!r}: a token count is an integer >= 1 (or None for any)")
    if exclude is None:
        exclude = ()
    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = frozenset(exclude)
    forced_by = None
    if force is not None:
        if not isinstance(force, str):
            raise OptionError(f"force={force!r}: name one backend (or backend/variant) for one problem")
        forced_by = "force"
    elif os.environ.get(ENV_BACKEND):
        force, forced_by = os.environ[ENV_BACKEND], f"${ENV_BACKEND}"
    if force is not None and (force in exclude or force.split("/")[0] in exclude):
        raise OptionError(f"{forced_by}={force!r} is also excluded (exclude={sorted(exclude)}): drop one of the two")
    return force, forced_by, exclude


def resolve(
    problem: Problem,
    *,
    tokens: int | None = None,
    force: str | None = None,
    exclude: Iterable[str] = (),
    activation_fallback: ActivationFallback = "weight_only",
    layouts: LayoutPolicy = "one",
    quarantine: str | os.PathLike[str] | None = None,
    tuning: str | os.PathLike[str] | None = None,
    allow_quarantined: bool = False,
    registry: Registry | None = None,
) -> Resolution:
    """Choose the candidate (backend or backend/variant) for ``problem`` and say why every other
    one was rejected.

    ``tokens=M`` answers for a batch of M tokens: what ``plan(problem, ...).at(M)`` serves,
    under the same ``layouts`` policy (with ``"one"``, the candidate of the plan's one weight
    layout). ``tokens=None`` answers for every batch size at once: candidates whose declared
    token range is not 1..infinity are rejected (rule ``tokens``) and survivors rank by priority,
    which is what a plan collapses to without measurements. Layers use the plan.

    Every rule of every candidate is evaluated. Survivors rank by measured cost where a tuning
    cache applies (see :mod:`quantoracle.oracle.tuning`), unmeasured ones after them by
    priority, then by name. ``force`` (default: ``$QUANTORACLE_BACKEND``) pins one backend (its
    variants may still split by M) or one ``backend/variant``; if it fails a rule,
    :class:`ForcedBackendError` lists why. ``exclude`` removes backends or variants; naming the
    forced one there too is an :class:`~quantoracle.errors.OptionError`.

    ``activation_fallback`` applies when the scheme has quantized activations and no candidate
    serves them natively: ``"weight_only"`` serves the weights with 16-bit activations,
    ``"emulate"`` picks a candidate that emulates the activation quantization exactly,
    ``"error"`` refuses. The :class:`Resolution` records which was taken.

    Quarantine entries (shipped, ``quarantine=`` / ``$QUANTORACLE_QUARANTINE``, run time) reject
    what they match with rule ``quarantined``; ``allow_quarantined=True`` ignores them all.

    Raises :class:`NoBackendError` (or :class:`ForcedBackendError`) when nothing fits,
    :class:`UnknownBackendError` for a name no plugin declares, and
    :class:`~quantoracle.errors.OptionError` / :class:`~quantoracle.errors.ProblemError` for
    bad arguments. Results are cached per (problem, options, registry state, environment).
    """
    problem = _problem(problem)
    force, forced_by, exclude = _options(force, exclude, activation_fallback, tokens)
    if layouts not in LAYOUT_POLICIES:
        raise OptionError(f"layouts={layouts!r}: use one of {', '.join(LAYOUT_POLICIES)}")
    registry = registry or default_registry()
    env = environment(quarantine, tuning, allow_quarantined)
    if tokens is not None and layouts == "one":
        from quantoracle.oracle.plan import _plan

        outcome = _plan(registry, registry.generation, problem, force, forced_by, exclude, activation_fallback,
                        layouts, env)
        if isinstance(outcome, QuantoracleError):
            raise outcome.with_traceback(None)
        return outcome.at(tokens)
    outcome = _resolve(registry, registry.generation, problem, tokens, force, forced_by, exclude,
                       activation_fallback, None, env)
    if isinstance(outcome, QuantoracleError):
        raise outcome.with_traceback(None)
    return outcome


@lru_cache(maxsize=8192)
def _resolve(
    registry: Registry,
    generation: int,
    problem: Problem,
    tokens: int | None,
    force: str | None,
    forced_by: str | None,
    exclude: frozenset[str],
    policy: ActivationFallback,
    layouts: frozenset[str] | None,
    env: Environment,
) -> Resolution | QuantoracleError:
    """The cached outcome: a Resolution, or the error resolve raises (failures are cached too)."""
    try:
        return _decide(registry, problem, tokens, force, forced_by, exclude, policy, layouts, env)
    except (NoBackendError, UnknownBackendError) as err:
        return err


def candidates(registry: Registry, kind: str) -> dict[str, Candidate]:
    """Every candidate for a layer kind, by label: each backend, or each of its variants that
    serves the kind (a backend none of whose variants does stays one candidate, rejected by
    ``layer_kind``)."""
    return _candidates(registry, registry.generation, kind)


class Provenance(NamedTuple):
    """What answers depend on besides problem and options, per registry state: ``packages``
    (every plugin distribution and kernel library with its version, sorted: the fingerprint's),
    ``versions`` (each backend's plugin distribution version) and ``distributions`` (each
    backend's plugin and kernel-library distributions: what a tuning cache is matched on)."""

    packages: tuple[tuple[str, str], ...]
    versions: dict[str, str | None]
    distributions: dict[str, tuple[str, ...]]


def provenance(registry: Registry | None = None) -> Provenance:
    """The :class:`Provenance` of ``registry`` (default: the process-wide one); cached."""
    registry = registry or default_registry()
    return Provenance(*_provenance(registry, registry.generation))


def fingerprint_for(device: Any, registry: Registry | None = None) -> Fingerprint:
    """The fingerprint answers about ``device`` (a :class:`Device`) carry here."""
    return fingerprint(device, provenance(registry).packages)


@lru_cache(maxsize=16)
def _provenance(registry: Registry, generation: int) -> tuple[tuple[tuple[str, str], ...], dict, dict]:
    """(every distribution an answer depends on with its version: each plugin's and each
    kernel library a backend ``requires`` that is installed; each backend's plugin distribution
    version; each backend's distributions), read once per registry state."""
    found = {d: v or "unknown" for d, v in registry.distributions().items()}
    origins = {name: registry.origin(name) for name in registry.backends}
    libraries = _module_distributions()
    dists: dict[str, tuple[str, ...]] = {}
    for name, backend in registry.backends.items():
        needed = [d for module in backend.spec.requires for d in libraries.get(module.split(".")[0], ())
                  if d not in SOFTWARE]  # torch and triton are fingerprint fields of their own
        for d in needed:
            found.setdefault(d, version_of(d) or "unknown")
        dists[name] = tuple(d for d in dict.fromkeys([origins[name].distribution, *needed]) if d)
    return tuple(sorted(found.items())), {n: o.version for n, o in origins.items()}, dists


@lru_cache(maxsize=1)
def _module_distributions() -> dict[str, list[str]]:
    from importlib.metadata import packages_distributions

    return packages_distributions()


@lru_cache(maxsize=64)
def _candidates(registry: Registry, generation: int, kind: str) -> dict[str, Candidate]:
    found: dict[str, Candidate] = {}
    for name, backend in registry.backends.items():
        spec = backend.spec
        variants = [(v.name, spec.for_variant(v)) for v in spec.variants]
        variants = [(v, s) for v, s in variants if kind in s.layer_kinds]
        if not variants:
            found[name] = Candidate(name, backend, None, spec)
        for variant, merged in variants:
            found[f"{name}/{variant}"] = Candidate(f"{name}/{variant}", backend, variant, merged)
    return found


def _selected(all_candidates: dict[str, Candidate], registry: Registry, force: str | None,
              exclude: frozenset[str]) -> dict[str, Candidate]:
    every = {label: c for kind in LAYER_KINDS for label, c in candidates(registry, kind).items()}
    unknown = sorted((({force} - {None}) | exclude) - set(every) - set(registry.backends))
    if unknown:
        variants = sorted(label for label in every if "/" in label)
        raise UnknownBackendError(
            f"unknown backend {', '.join(map(repr, unknown))}; registered: {', '.join(registry.backends)}"
            + (f" (variants: {', '.join(variants)})" if variants else "")
        )

    def named(label: str, names: Iterable[str]) -> bool:
        return any(label == n or label.split("/")[0] == n for n in names)

    if force is not None:
        # a variant of another layer kind is judged (and rejected by layer_kind) like any other
        return {label: c for label, c in all_candidates.items() if named(label, (force,))} or {force: every[force]}
    return {label: c for label, c in all_candidates.items() if not named(label, exclude)}


def _decide(
    registry: Registry, problem: Problem, tokens: int | None, force: str | None, forced_by: str | None,
    exclude: frozenset[str], policy: ActivationFallback, layouts: frozenset[str] | None, env: Environment,
) -> Resolution:
    chosen = _selected(candidates(registry, problem.kind), registry, force, exclude)
    packages, versions, distributions = _provenance(registry, registry.generation)
    fp = fingerprint(problem.device, packages)
    usable, notes = env.tuning.applicable(fp, distributions)

    def judge(effective: Problem, emulate: bool) -> dict[str, tuple[RuleFailure, ...]]:
        return {
            label: evaluate(c.spec, effective, Context(
                allow_emulation=emulate, tokens=tokens, variant=c.variant, layouts=layouts,
                quarantine=env.quarantine, gpu_name=fp.gpu_name, version=versions.get(c.spec.name)))
            for label, c in chosen.items()
        }

    asked = judge(problem, False)
    stages: list[tuple[str | None, Problem, bool]] = [(None, problem, False)]
    if problem.scheme.activation is not None and policy != "error":
        if policy == "weight_only":
            stages.append(("weight_only", problem.with_scheme(problem.scheme.as_weight_only()), False))
        else:
            stages.append(("emulate", problem, True))

    for fallback, effective, emulate in stages:
        verdicts = asked if fallback is None else judge(effective, emulate)
        passed = [label for label, failures in verdicts.items() if not failures]
        if not passed:
            continue
        decision = Tuning.decide(usable, effective, tokens) if tokens is not None and usable else None
        costs = decision.costs if decision else {}
        if not any(label in costs for label in passed):
            decision = None
        priorities = {label: chosen[label].spec.priority for label in passed}
        survivors = sorted(passed, key=lambda label: (
            (0, costs[label], label) if label in costs else (1, -priorities[label], label)))
        best = chosen[survivors[0]]
        return Resolution(
            problem=problem,
            backend=best.backend,
            scheme=effective.scheme,
            survivors=tuple(survivors),
            rejections={n: f for n, f in verdicts.items() if f},
            fallback=fallback,
            asked_rejections={n: f for n, f in asked.items() if f} if fallback else {},
            forced_by=forced_by if force is not None else None,
            note=_note(fallback, problem, asked),
            variant=best.variant,
            layout=best.spec.layout_name,
            tokens=tokens,
            ranking="measured" if decision else "priority",
            decided_by=decision,
            priorities=priorities,
            fingerprint=fp,
            notes=tuple(notes),
            quarantine_sources=env.quarantine_sources,
        )

    if force is not None:
        raise ForcedBackendError(
            problem, asked,
            f"the forced backend {force!r} ({forced_by}) cannot serve this layer"
            + ("" if tokens is None else f" at {tokens} tokens")
            + "; quantoracle does not fall back silently: force another backend, or none",
            tokens,
        )
    excluded = f" (excluded: {', '.join(sorted(exclude))})" if exclude else ""
    hint = f"no registered backend{excluded} passes every rule; "
    if problem.scheme.activation is not None and policy == "error":
        hint += "activation_fallback='weight_only' or 'emulate' would relax the activation rule; "
    hint += "install a plugin that serves this case, or change the device, dtype or sharding"
    raise NoBackendError(problem, asked, hint, tokens)


_SCHEME_RULES = frozenset({"weight_scheme", "activation_scheme", "layer_kind"})


def _note(fallback: str | None, problem: Problem, asked: Rejections) -> str:
    """What the fallback did, and which rules stopped the candidates that serve the scheme as
    asked (a native W4A4 backend rejected for its capability, say)."""
    if fallback is None:
        return ""
    native = {label: failures for label, failures in asked.items() if not {f.code for f in failures} & _SCHEME_RULES}
    if native:
        why = "; ".join(f"{label} is rejected by {', '.join(f'[{f.code}]' for f in failures)}"
                        for label, failures in native.items())
        cause = f"the backend(s) serving activation key {describe_activation(problem.scheme.activation)} natively cannot here: {why}"
    else:
        cause = f"no registered backend runs activation key {describe_activation(problem.scheme.activation)} natively"
    if fallback == "weight_only":
        return (f"{cause}; serving the weights with 16-bit activations (the checkpoint's input_scale is "
                "unused; outputs differ from W4A4 numerics)")
    return f"{cause}; emulating the activation quantization exactly"


def clear_caches() -> None:
    """Forget every cached answer (tests, or after changing files by hand within a second)."""
    from quantoracle.oracle.plan import _plan

    _resolve.cache_clear()
    _plan.cache_clear()
    _candidates.cache_clear()
    _provenance.cache_clear()
    _environment.cache_clear()
