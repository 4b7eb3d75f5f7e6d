"""WHICH backend: the rules engine. Knows backends only through the ``quantoracle_backends`` hook."""

from quantoracle.oracle.engine import (
    ForcedBackendError,
    NoBackendError,
    Resolution,
    UnknownBackendError,
    resolve,
)
from quantoracle.oracle.hookspecs import hookimpl
from quantoracle.oracle.registry import Registry, default_registry
from quantoracle.oracle.rules import RuleFailure
from quantoracle.oracle.spec import (
    ANY,
    Backend,
    BackendSpec,
    Device,
    ParallelConfig,
    Problem,
    SchemeSupport,
)

__all__ = [
    "ANY", "Backend", "BackendSpec", "Device", "ForcedBackendError", "NoBackendError",
    "ParallelConfig", "Problem", "Registry", "Resolution", "RuleFailure", "SchemeSupport",
    "UnknownBackendError", "default_registry", "hookimpl", "resolve",
]
