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
    """A backend plugin is broken: its module does not import (a spec that fails validation
    fails there), pluggy refuses its hook (wrong signature, name taken), its
    ``quantoracle_backends`` hook raises or returns something other than a sequence of backends,
    or it declares a backend name an earlier plugin declared.

    The registry records it in ``Registry.broken`` (or raises it when strict). Fields, ``None``
    where not known (all of them for an error raised outside the registry, such as a backend
    asked to prepare a layer kind it has no kernels for):

    - ``plugin``: the plugin's registered name;
    - ``entry_point``: the ``importlib.metadata.EntryPoint`` it came from (``group``, ``name``,
      ``value``); ``None`` for a built-in or a plugin registered by code;
    - ``distribution``, ``version``: the installed distribution that provides it;
    - ``cause``: what is wrong, one sentence; the exception behind it, if any, is ``__cause__``.
    """

    def __init__(
        self,
        message: str,
        *,
        plugin: str | None = None,
        cause: str | None = None,
        entry_point: object = None,  # importlib.metadata.EntryPoint
        distribution: str | None = None,
        version: str | None = None,
    ) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.cause = cause
        self.entry_point = entry_point
        self.distribution = distribution
        self.version = version


class UnsupportedModelError(QuantoracleError, ValueError):
    """A model the transformers integration cannot patch: a module layout it does not know, a
    model on the meta device, a transformers conversion it cannot follow. The message names the
    module."""


class CalibrationError(QuantoracleError, ValueError):
    """W4A4 quantization lacks the calibrated input amax of a module it quantizes."""


class DeviceError(QuantoracleError, ValueError):
    """A device that quantoracle cannot parse or probe: ``"sm00"``, ``None``, ``"tpu"``."""


class InputError(QuantoracleError, ValueError):
    """A tensor given to a layer at call or build time has the wrong shape, dtype or values: a
    hidden size that is not the layer's, integer activations, expert ids outside ``[0, E)``,
    router logits of the wrong width. The message names the layer, the tensor, what was found
    and what was expected. (A ValueError, as torch raises for such input; unlike ProblemError it
    never passes through pydantic.)"""


class QuarantineError(QuantoracleError, ValueError):
    """A quarantine file that cannot be read: bad JSON/TOML, an entry with a wrong field."""


class TuningCacheError(QuantoracleError, ValueError):
    """A tuning cache file that cannot be read or written."""


class CheckpointPathError(CheckpointFormatError):
    """A path given as a checkpoint or model directory is none: it does not exist (a Hugging Face
    hub id is not downloaded), it is a file, or it holds no config.json. The message names the
    path and what to pass instead."""


class UnquantizedModelError(CheckpointFormatError):
    """A 16-bit model directory (config.json without quantization_config, no
    hf_quant_config.json) where a quantized checkpoint is needed. The message names the command
    that quantizes it."""


class OptionError(QuantoracleError, ValueError):
    """Options that contradict each other or have a wrong type: ``force`` also in ``exclude``,
    an unknown ``activation_fallback``, ``tokens=0``."""


class NumericsCheckError(QuantoracleError):
    """The numerics check (``verify="strict"``) found a backend's output too far from the exact
    reference, or not finite. The message names the backend, token count, error and tolerance."""
