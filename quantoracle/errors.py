"""The exceptions quantoracle raises. Every message says what was wrong and how to fix it."""

from __future__ import annotations


class QuantoracleError(Exception):
    """Base class of every error quantoracle raises on purpose."""


class SchemeError(QuantoracleError, ValueError):
    """A quantization key, scheme or scheme name is invalid or unknown."""


class NumericsError(QuantoracleError, ValueError):
    """Input that NVFP4 cannot represent: NaN or Inf values, K not a multiple of 16, wrong dtype."""


class CheckpointFormatError(QuantoracleError):
    """A checkpoint file is malformed: bad JSON, unknown quant_algo, a missing or mis-shaped tensor.

    The message names the file, the field or tensor, what was expected and what was found.
    """


class ProblemError(QuantoracleError):
    """A layer problem that is inconsistent in itself, whatever the backend: experts not divisible
    by the expert-parallel size, a rank out of range, a MoE problem without experts.

    (Not a ValueError on purpose: pydantic would wrap it into a ValidationError.)"""


class PluginError(QuantoracleError):
    """A backend plugin is broken: duplicate backend names, an object that is not a backend."""


class UnsupportedModelError(QuantoracleError, ValueError):
    """A model the transformers integration cannot patch: a module layout it does not know, a
    model on the meta device, a transformers conversion it cannot follow. The message names the
    module."""


class CalibrationError(QuantoracleError, ValueError):
    """W4A4 quantization lacks the calibrated input amax of a module it quantizes."""
