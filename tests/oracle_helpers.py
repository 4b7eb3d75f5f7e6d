"""Registries for oracle tests: the built-ins plus the example W4A4 plugin of docs/examples,
registered directly (the entry-point path is tested separately) and a declared-only FP8 backend
that widens the scheme space the engine must reason about."""

import importlib.util
import pathlib

from quantoracle.backends.base import KernelBackend, Kernels
from quantoracle.oracle import BackendSpec, Registry, SchemeSupport, hookimpl
from quantoracle.schemes import FP8_ACT_PER_TOKEN_DYNAMIC, FP8_WEIGHT_PER_CHANNEL, W8A16_FP8

EXAMPLE = pathlib.Path(__file__).parents[1] / "docs/examples/quantoracle-example-w4a4"


def load_example_plugin():
    spec = importlib.util.spec_from_file_location(
        "example_w4a4_plugin", EXAMPLE / "quantoracle_example_w4a4/plugin.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _no_kernels() -> Kernels:
    raise NotImplementedError("declared only: used to test the rules, never run")


class FP8Plugin:
    """Declares an FP8 Linear backend for sm89+ with tensor parallelism but no MoE."""

    @hookimpl
    def quantoracle_backends(self):
        spec = BackendSpec(
            name="declared_fp8",
            layer_kinds={"linear"},
            schemes=(
                SchemeSupport(weight=FP8_WEIGHT_PER_CHANNEL, activation=FP8_ACT_PER_TOKEN_DYNAMIC),
                SchemeSupport(weight=W8A16_FP8.weight, activation=None),
            ),
            platforms={"cuda"},
            min_capability=(8, 9),
            n_multiple_of=64,
            k_multiple_of=128,
            expert_parallel=False,
            priority=5,
        )
        return [KernelBackend(spec, _no_kernels)]


def registry_with_extras() -> Registry:
    registry = Registry(entry_points=False)
    registry.register(load_example_plugin(), name="example_w4a4")
    registry.register(FP8Plugin(), name="declared_fp8")
    return registry
