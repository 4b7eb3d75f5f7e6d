"""The per-layer answer of a checkpoint's quantization config: :class:`QuantConfig`.

Both formats parse into it (``modelopt.py``, ``compressed_tensors.py``); ``scheme_for(name)``
answers which :class:`~quantoracle.schemes.scheme.Scheme` a module has, or None (16-bit).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Literal

from quantoracle.errors import CheckpointFormatError, SchemeError
from quantoracle.schemes.checkpoint.layout import FUSED_PROJECTIONS, Format
from quantoracle.schemes.scheme import Scheme

ActivationOverride = Literal["none"]
ACTIVATION_OVERRIDES: tuple[str, ...] = ("none",)


def matches(name: str, pattern: str) -> bool:
    """Whether a module name matches a pattern: ``re:<regex>`` (compressed-tensors, ``re.match``)
    or an fnmatch glob (ModelOpt's exclude_modules; an exact name is a glob without wildcards)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return fnmatchcase(name, pattern)


@dataclass(frozen=True)
class QuantConfig:
    """Which scheme each module of a checkpoint has.

    - ``format``: "modelopt" or "compressed-tensors"; ``source``: the file it was read from.
    - ``default``: the scheme of a module nothing else names (None: such modules are 16-bit,
      as in ModelOpt's MIXED_PRECISION).
    - ``layers``: exact module name -> scheme (MIXED_PRECISION's ``quantized_layers``,
      compressed-tensors groups that target names).
    - ``patterns``: ``(re:<regex>, scheme)`` pairs, tried in order after exact names.
    - ``exclude``: patterns (see :func:`matches`) of modules left 16-bit.
    - ``override_activation``: "none" serves every W4A4 layer weight-only
      (:meth:`Scheme.as_weight_only`); None keeps the checkpoint's schemes.
    """

    format: Format
    source: str
    default: Scheme | None
    layers: Mapping[str, Scheme] = field(default_factory=dict)
    patterns: tuple[tuple[str, Scheme], ...] = ()
    exclude: tuple[str, ...] = ()
    override_activation: ActivationOverride | None = None

    def __post_init__(self) -> None:
        if self.override_activation not in (None, *ACTIVATION_OVERRIDES):
            raise SchemeError(
                f"override_activation={self.override_activation!r}; use None (keep the "
                f"checkpoint's activation scheme) or one of {ACTIVATION_OVERRIDES}"
            )

    def __repr__(self) -> str:
        return (
            f"QuantConfig({self.format} from {self.source!r}, default {self.default or 'none'}, "
            f"{len(self.layers)} named layers, {len(self.patterns)} patterns, "
            f"{len(self.exclude)} excludes, override_activation={self.override_activation!r})"
        )

    def with_override(self, override_activation: ActivationOverride | None) -> QuantConfig:
        """The same config with another activation override."""
        return dataclasses.replace(self, override_activation=override_activation)

    @cached_property
    def _exclude_split(self) -> tuple[frozenset[str], tuple[str, ...]]:
        """(exact names, patterns): a set lookup first keeps long exclude lists fast."""
        wildcard = [p for p in self.exclude if p.startswith("re:") or any(c in p for c in "*?[")]
        return frozenset(self.exclude) - frozenset(wildcard), tuple(wildcard)

    def excluded(self, name: str) -> bool:
        """Whether an exclude entry matches ``name`` (see :func:`matches`)."""
        names, patterns = self._exclude_split
        return name in names or any(matches(name, pattern) for pattern in patterns)

    def scheme_for(self, module_name: str) -> Scheme | None:
        """The scheme of module ``module_name``, or None if it is not quantized.

        In order: an excluded module is None; an exact ``layers`` entry; a fused projection
        (``qkv_proj``, ``gate_up_proj``) takes its shards' common scheme; a ``patterns`` match;
        a prefix such as a MoE block ``model.layers.3.mlp.experts`` takes the common scheme of
        the ``layers`` entries under it; else ``default``. Raises CheckpointFormatError when the
        shards or entries under a prefix disagree (no engine can serve them as one layer).
        """
        scheme = self._stored_scheme(module_name)
        if scheme is not None and self.override_activation == "none":
            return scheme.as_weight_only()
        return scheme

    def _stored_scheme(self, name: str) -> Scheme | None:
        if self.excluded(name):
            return None
        if name in self.layers:
            return self.layers[name]
        base, _, leaf = name.rpartition(".")
        if leaf in FUSED_PROJECTIONS:
            shards = [f"{base}.{shard}" if base else shard for shard in FUSED_PROJECTIONS[leaf]]
            if any(s in self.layers or self.excluded(s) for s in shards):
                return self._common(name, {s: self._stored_scheme(s) for s in shards})
        for pattern, scheme in self.patterns:
            if matches(name, pattern):
                return scheme
        children = {k: v for k, v in self.layers.items() if k.startswith(name + ".")}
        if children:
            return self._common(name, children)
        return self.default

    def _common(self, name: str, members: Mapping[str, Scheme | None]) -> Scheme | None:
        distinct = set(members.values())
        if len(distinct) > 1:
            listing = ", ".join(f"{k}: {v or 'unquantized'}" for k, v in sorted(members.items()))
            raise CheckpointFormatError(
                f"{self.source}: {name} is served as one layer but its parts are quantized "
                f"differently ({listing}); re-export them with one scheme"
            )
        return distinct.pop()


__all__ = ["QuantConfig", "matches", "ActivationOverride", "ACTIVATION_OVERRIDES"]
