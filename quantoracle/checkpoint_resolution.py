"""Resolve every quantized layer of a checkpoint directory (``quantoracle resolve PATH``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantoracle.errors import ProblemError, QuantoracleError
from quantoracle.oracle import Device, NoBackendError, Plan, Problem, Resolution, default_registry, plan, resolve
from quantoracle.oracle.engine import ENV_BACKEND, ActivationFallback, Force, UnknownBackendError, force_for_layer
from quantoracle.oracle.spec import ActivationDtype
from quantoracle.schemes.checkpoint import Checkpoint, LayerEntry
from quantoracle.schemes.scheme import Scheme

DEFAULT_TOP_K = 8


class UnmatchedForceError(QuantoracleError, ValueError):
    """A ``force`` mapping has a layer-name glob that matches no quantized layer of the
    checkpoint (a typo would otherwise be ignored silently)."""


@dataclass
class LayerGroup:
    """Layers that resolve identically: same kind, checkpoint scheme, problem and forced backend.

    ``checkpoint_scheme`` is the scheme stored in the checkpoint; ``problem.scheme`` the one
    asked for (after an activation override); a :class:`Resolution`'s ``scheme`` the one served
    (after an activation fallback)."""

    names: list[str]
    checkpoint_scheme: Scheme
    problem: Problem
    outcome: Resolution | NoBackendError
    plan: Plan | None = None

    @property
    def backend(self) -> str | None:
        return None if isinstance(self.outcome, NoBackendError) else self.outcome.name

    @property
    def served_scheme(self) -> Scheme | None:
        return None if isinstance(self.outcome, NoBackendError) else self.outcome.scheme

    def to_dict(self) -> dict[str, Any]:
        """The layer names, the schemes by name, then the resolution's own summary
        (:meth:`Resolution.to_dict`) or, when no backend serves the layers, the problem, the
        error and each backend's failed rules (``code``, ``found``, ``accepted``, ``message``)."""
        schemes = {
            "checkpoint_scheme": self.checkpoint_scheme.name, "requested_scheme": self.problem.scheme.name,
            "served_scheme": None if self.served_scheme is None else self.served_scheme.name,
        }
        data: dict[str, Any] = {"layers": self.names, "kind": self.problem.kind, **schemes}
        if isinstance(self.outcome, NoBackendError):
            data.update(
                backend=None, problem=self.problem.model_dump(mode="json"),
                error={"type": type(self.outcome).__name__, "message": str(self.outcome)},
                rejections={name: [f.model_dump() for f in failures]
                            for name, failures in self.outcome.rejections.items()},
            )
        else:
            data.update(self.outcome.to_dict())
            data.update(schemes)  # the stored scheme, not the requested one, is the checkpoint's
            data["plan"] = self.plan.to_list()
            data["layouts"] = list(self.plan.layouts)
        return data


@dataclass
class CheckpointResolution:
    """Every quantized layer of a checkpoint, resolved, and the settings that decided it.
    ``env_force`` is ``$QUANTORACLE_BACKEND`` when it was set: it forces every layer that
    ``force`` does not name."""

    directory: str
    format: str
    config_file: str
    device: Device
    dtype: ActivationDtype
    activation_fallback: ActivationFallback
    override_activation: str | None
    force: Force
    env_force: str | None
    exclude: tuple[str, ...]
    top_k: int
    top_k_source: str
    layouts: str = "one"
    tuning: str | None = None
    quarantine: str | None = None
    groups: list[LayerGroup] = field(default_factory=list)

    @property
    def unserved(self) -> list[LayerGroup]:
        return [g for g in self.groups if g.backend is None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.directory, "format": self.format, "config_file": self.config_file,
            "device": str(self.device), "dtype": self.dtype, "activation_fallback": self.activation_fallback,
            "override_activation": self.override_activation, "force": self.force,
            "env_force": self.env_force, "exclude": list(self.exclude),
            "top_k": self.top_k, "top_k_source": self.top_k_source, "layouts": self.layouts,
            "tuning": self.tuning, "quarantine": self.quarantine,
            "groups": [g.to_dict() for g in self.groups],
        }


def _top_k(directory: Path, given: int | None) -> tuple[int | None, str]:
    """The top-k and where it came from; ``None`` (no config, none given): each MoE layer takes
    ``min(DEFAULT_TOP_K, experts)``."""
    if given is not None:
        return given, "--top-k"
    config = directory / "config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("num_experts_per_tok")
        if isinstance(value, int):
            return value, "config.json num_experts_per_tok"
    return None, f"default {DEFAULT_TOP_K} (no config.json num_experts_per_tok; pass --top-k)"


def problem_of(entry: LayerEntry, device: Device, dtype: ActivationDtype, top_k: int) -> Problem:
    """The :class:`Problem` of one checkpoint layer (unsharded). ``top_k`` above the layer's
    experts raises :class:`ProblemError`."""
    if entry.kind == "linear":
        return Problem(kind="linear", scheme=entry.scheme, device=device, dtype=dtype, n=entry.n, k=entry.k)
    return Problem(kind="moe", scheme=entry.scheme, device=device, dtype=dtype, n=entry.intermediate,
                   k=entry.hidden, experts=entry.experts, top_k=top_k)


def _check_force(force: Force, env_force: str | None) -> None:
    """Every backend ``force`` or ``$QUANTORACLE_BACKEND`` names exists, whether or not a layer
    ends up using it."""
    known = default_registry().backends
    named = [(force, "force")] if isinstance(force, str) else [
        (backend, f"force {glob}={backend}") for glob, backend in (force or {}).items()]
    if env_force is not None and not isinstance(force, str):
        named.append((env_force, f"${ENV_BACKEND}={env_force}"))
    for backend, where in named:
        if backend not in known:
            raise UnknownBackendError(f"{where}: unknown backend {backend!r}; registered: {', '.join(known)}")


def resolve_checkpoint(
    directory: str | Path,
    device: Device,
    *,
    dtype: ActivationDtype = "bfloat16",
    top_k: int | None = None,
    override_activation: str | None = None,
    activation_fallback: ActivationFallback = "weight_only",
    force: Force = None,
    exclude: tuple[str, ...] = (),
    layouts: str = "one",
    tuning: str | None = None,
    quarantine: str | None = None,
    allow_quarantined: bool = False,
) -> CheckpointResolution:
    """Resolve every quantized layer of a checkpoint on ``device``, grouping identical ones.

    ``force`` is a backend name or a mapping from layer-name glob to backend name; layers it
    does not name follow ``$QUANTORACLE_BACKEND`` if set, else resolve as usual. Raises
    :class:`UnknownBackendError` for a backend name no plugin declares (in ``force`` or the
    environment), :class:`UnmatchedForceError` for a glob that matches no quantized layer, and
    :class:`ProblemError` for a ``top_k`` (given or from config.json) above a layer's experts.
    Each group also carries its :class:`Plan` (per batch size; ``layouts``, ``tuning``,
    ``quarantine`` and ``allow_quarantined`` as in :func:`quantoracle.plan`).
    """
    directory = Path(directory)
    env_force = os.environ.get(ENV_BACKEND) or None
    _check_force(force, env_force)
    groups: dict[tuple, LayerGroup] = {}
    with Checkpoint.open(directory, override_activation=override_activation) as ckpt:
        k, source = _top_k(directory, top_k)  # after open: it has checked config.json
        stored = ckpt.config.with_override(None)
        result = CheckpointResolution(
            str(directory), ckpt.config.format, ckpt.config.source, device, dtype, activation_fallback,
            override_activation, force, env_force, tuple(exclude), DEFAULT_TOP_K if k is None else k, source,
            layouts, None if tuning is None else str(tuning), None if quarantine is None else str(quarantine))
        options = dict(exclude=exclude, activation_fallback=activation_fallback, layouts=layouts, tuning=tuning,
                       quarantine=quarantine, allow_quarantined=allow_quarantined)
        for entry in ckpt.layers():
            if entry.kind == "moe" and k is not None and k > entry.experts:
                raise ProblemError(f"top-k {k} (from {source}) exceeds the {entry.experts} experts of "
                                   f"{entry.name}; use a top-k of 1..{entry.experts}")
            layer_top_k = min(DEFAULT_TOP_K, entry.experts or DEFAULT_TOP_K) if k is None else k
            problem = problem_of(entry, device, dtype, layer_top_k)
            forced = force_for_layer(force, entry.name)
            checkpoint_scheme = stored.scheme_for(entry.name)
            group_plan = None
            try:
                group_plan = plan(problem, force=forced, **options)
                outcome: Resolution | NoBackendError = group_plan.first
            except NoBackendError as err:
                outcome = err
            key = (checkpoint_scheme, problem, forced)  # the outcome follows from these
            if key in groups:
                groups[key].names.append(entry.name)
            else:
                groups[key] = LayerGroup([entry.name], checkpoint_scheme, problem, outcome, group_plan)
    if isinstance(force, Mapping):
        layers = [name for g in groups.values() for name in g.names]
        for glob, backend in force.items():
            if not any(force_for_layer({glob: backend}, name) for name in layers):
                example = f"layer names look like {layers[0]!r}" if layers else "it has no quantized layer"
                raise UnmatchedForceError(
                    f"force {glob}={backend}: the glob matches no quantized layer of {directory} ({example})")
    result.groups = list(groups.values())
    return result


__all__ = ["CheckpointResolution", "LayerGroup", "UnmatchedForceError", "problem_of", "resolve_checkpoint"]
