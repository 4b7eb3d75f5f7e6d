"""The Humming backend object: a :class:`KernelBackend` whose ``prepare`` hands the kernels the
effective problem, because Humming compiles its kernels per activation dtype (and the MoE
activation is fused into its input processing) at prepare time."""

from __future__ import annotations

from typing import Any

from quantoracle.backends.base import KernelBackend, Prepared
from quantoracle.oracle.spec import Problem


class HummingBackend(KernelBackend):
    def prepare(self, weights: Any, problem: Problem) -> Prepared:
        k = self.kernels
        prepare = k.prepare_linear if problem.kind == "linear" else k.prepare_moe
        return Prepared(problem.kind, prepare(weights, problem), not problem.scheme.weight_only,
                        problem.moe_activation)
