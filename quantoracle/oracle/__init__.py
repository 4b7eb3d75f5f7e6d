"""WHICH backend: the rules engine. Knows backends only through the ``quantoracle_backends`` hook."""

from quantoracle.oracle.engine import (
    ForcedBackendError,
    NoBackendError,
    Resolution,
    UnknownBackendError,
    resolve,
)
from quantoracle.oracle.fingerprint import Fingerprint
from quantoracle.oracle.plan import Bucket, Plan, plan
from quantoracle.oracle.quarantine import QuarantineEntry
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
    Variant,
)

__all__ = [
    "ANY", "Backend", "BackendSpec", "Bucket", "Device", "Fingerprint", "ForcedBackendError", "NoBackendError",
    "ParallelConfig", "Plan", "Problem", "QuarantineEntry", "Registry", "Resolution", "RuleFailure",
    "SchemeSupport", "UnknownBackendError", "Variant", "default_registry", "hookimpl", "plan", "resolve",
]
