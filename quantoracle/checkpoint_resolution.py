"""Resolve every quantized layer of a checkpoint directory (``quantoracle resolve PATH``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantoracle.oracle import Device, NoBackendError, Problem, Resolution, resolve
from quantoracle.oracle.engine import ActivationFallback, Force, force_for_layer
from quantoracle.oracle.spec import ActivationDtype
from quantoracle.schemes.checkpoint import Checkpoint, LayerEntry

DEFAULT_TOP_K = 8


@dataclass
class LayerGroup:
    """Layers that resolve identically: same kind, scheme, shapes and outcome."""

    names: list[str]
    problem: Problem
    outcome: Resolution | NoBackendError

    @property
    def backend(self) -> str | None:
        return None if isinstance(self.outcome, NoBackendError) else self.outcome.name

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"layers": self.names}
        if isinstance(self.outcome, NoBackendError):
            data.update(problem=self.problem.model_dump(mode="json"), backend=None, error=str(self.outcome))
        else:
            data.update(self.outcome.to_dict())
        return data


@dataclass
class CheckpointResolution:
    directory: str
    device: Device
    top_k: int
    top_k_source: str
    groups: list[LayerGroup] = field(default_factory=list)

    @property
    def unserved(self) -> list[LayerGroup]:
        return [g for g in self.groups if g.backend is None]

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.directory, "device": str(self.device), "top_k": self.top_k,
                "top_k_source": self.top_k_source, "groups": [g.to_dict() for g in self.groups]}


def _top_k(directory: Path, given: int | None) -> tuple[int, str]:
    if given is not None:
        return given, "--top-k"
    config = directory / "config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("num_experts_per_tok")
        if isinstance(value, int):
            return value, "config.json num_experts_per_tok"
    return DEFAULT_TOP_K, f"default {DEFAULT_TOP_K} (no config.json num_experts_per_tok; pass --top-k)"


def problem_of(entry: LayerEntry, device: Device, dtype: ActivationDtype, top_k: int) -> Problem:
    """The :class:`Problem` of one checkpoint layer (unsharded)."""
    if entry.kind == "linear":
        return Problem(kind="linear", scheme=entry.scheme, device=device, dtype=dtype, n=entry.n, k=entry.k)
    return Problem(kind="moe", scheme=entry.scheme, device=device, dtype=dtype, n=entry.intermediate,
                   k=entry.hidden, experts=entry.experts, top_k=min(top_k, entry.experts))


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
) -> CheckpointResolution:
    """Resolve every quantized layer of a checkpoint on ``device``, grouping identical ones.
    ``force`` is a backend name or a mapping from layer-name glob to backend name."""
    directory = Path(directory)
    k, source = _top_k(directory, top_k)
    result = CheckpointResolution(str(directory), device, k, source)
    groups: dict[tuple, LayerGroup] = {}
    with Checkpoint.open(directory, override_activation=override_activation) as ckpt:
        for entry in ckpt.layers():
            problem = problem_of(entry, device, dtype, k)
            forced = force_for_layer(force, entry.name)
            try:
                outcome: Resolution | NoBackendError = resolve(
                    problem, force=forced, exclude=exclude, activation_fallback=activation_fallback)
            except NoBackendError as err:
                outcome = err
            key = (problem, forced)  # the outcome follows from these
            if key in groups:
                groups[key].names.append(entry.name)
            else:
                groups[key] = LayerGroup([entry.name], problem, outcome)
    result.groups = list(groups.values())
    return result


def parse_force(values: list[str] | None) -> Force:
    """``--force BACKEND`` or repeated ``--force GLOB=BACKEND``."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    pairs: dict[str, str] = {}
    for value in values:
        glob, sep, backend = value.partition("=")
        if not sep or not glob or not backend:
            raise ValueError(f"--force {value!r}: write BACKEND, or GLOB=BACKEND per layer pattern")
        pairs[glob] = backend
    return pairs


def describe_force(force: Force) -> str:
    if force is None:
        return "none"
    return force if isinstance(force, str) else ", ".join(f"{g}={b}" for g, b in force.items())


__all__ = ["CheckpointResolution", "LayerGroup", "describe_force", "parse_force",
           "problem_of", "resolve_checkpoint"]
