"""Quantized checkpoints: ModelOpt and compressed-tensors configs, read into one per-layer answer
(:class:`QuantConfig`), NVFP4 tensors read from sharded safetensors (:class:`Checkpoint`), and
16-bit models quantized and written in either format (:func:`write_checkpoint`)."""

from quantoracle.schemes.checkpoint.config import QuantConfig
from quantoracle.schemes.checkpoint.detect import load_quant_config
from quantoracle.schemes.checkpoint.reader import Checkpoint, LayerEntry
from quantoracle.schemes.checkpoint.storage import SafetensorsDirectory
from quantoracle.schemes.checkpoint.writer import (
    DEFAULT_EXCLUDE,
    SIDE_FILES,
    QuantizeSummary,
    quantize_checkpoint,
    quantize_state_dict,
    write_checkpoint,
)

load_checkpoint = Checkpoint.open
"""The top-level name (``quantoracle.load_checkpoint``) of :meth:`Checkpoint.open`:
``load_checkpoint(directory, override_activation=None, allow_outside_paths=False)``."""

__all__ = [
    "QuantConfig",
    "load_quant_config",
    "Checkpoint",
    "load_checkpoint",
    "LayerEntry",
    "SafetensorsDirectory",
    "DEFAULT_EXCLUDE",
    "SIDE_FILES",
    "QuantizeSummary",
    "quantize_state_dict",
    "write_checkpoint",
    "quantize_checkpoint",
]
