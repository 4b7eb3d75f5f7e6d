"""The one backend shape every NVFP4 plugin here shares: four kernel functions behind the
``prepare`` / ``apply`` contract of :class:`quantoracle.oracle.Backend`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import torch

from quantoracle.errors import PluginError
from quantoracle.oracle.spec import BackendSpec, Problem


class Kernels(NamedTuple):
    """A backend's entry points, in this order (a Linear-only backend leaves the MoE pair out):

    - ``prepare_linear(NVFP4Tensor) -> state``; ``linear(x, state, *, quantize_activations,
      variant)``.
    - ``prepare_moe(MoEWeights) -> state``; ``fused_moe(x, state, topk_weights, topk_ids, *,
      activation, quantize_activations, variant)``.

    ``quantize_activations`` is true when the effective scheme quantizes activations (W4A4).
    ``variant`` (passed only to backends that declare variants) names the spec's variant the
    plan chose for this call.
    """

    prepare_linear: Callable[[Any], Any]
    linear: Callable[..., torch.Tensor]
    prepare_moe: Callable[[Any], Any] | None = None
    fused_moe: Callable[..., torch.Tensor] | None = None


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` returns: the backend's weight state and how to run it."""

    kind: str
    state: Any
    quantize_activations: bool
    activation: str | None


class KernelBackend:
    """A backend from its spec and a loader of its :class:`Kernels`.

    The loader runs on first ``prepare``, not at plugin import, so declaring a backend never
    imports its kernel stack (Triton may be absent: the ``requires`` rule says so instead).
    """

    def __init__(self, spec: BackendSpec, load: Callable[[], Kernels]) -> None:
        self.spec = spec
        self._load = load

    def __repr__(self) -> str:
        return f"<backend {self.spec.name}>"

    @cached_property
    def kernels(self) -> Kernels:
        return self._load()

    def prepare(self, weights: Any, problem: Problem) -> Prepared:
        k = self.kernels
        prepare = k.prepare_linear if problem.kind == "linear" else k.prepare_moe
        if prepare is None:
            raise PluginError(f"backend {self.spec.name} declares layer kind {problem.kind} but its Kernels "
                              "have no prepare_moe/fused_moe: add them, or drop 'moe' from layer_kinds")
        return Prepared(problem.kind, prepare(weights), not problem.scheme.weight_only, problem.moe_activation)

    def apply(
        self,
        prepared: Prepared,
        x: torch.Tensor,
        topk_weights: torch.Tensor | None = None,
        topk_ids: torch.Tensor | None = None,
        *,
        variant: str | None = None,
    ) -> torch.Tensor:
        chosen = {} if variant is None else {"variant": variant}  # backends without variants need no parameter
        if prepared.kind == "linear":
            return self.kernels.linear(x, prepared.state, quantize_activations=prepared.quantize_activations, **chosen)
        return self.kernels.fused_moe(
            x, prepared.state, topk_weights, topk_ids,
            activation=prepared.activation, quantize_activations=prepared.quantize_activations, **chosen,
        )
