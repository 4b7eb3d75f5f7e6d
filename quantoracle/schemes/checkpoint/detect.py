"""Find and parse the quantization config of a checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantoracle.errors import CheckpointFormatError
from quantoracle.schemes.checkpoint import compressed_tensors, modelopt
from quantoracle.schemes.checkpoint.config import ActivationOverride, QuantConfig

HF_QUANT_CONFIG = "hf_quant_config.json"
CONFIG = "config.json"


def read_json(path: Path) -> Any:
    """The parsed JSON of ``path``; CheckpointFormatError (naming the file and the position)
    when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointFormatError(
            f"{path}: not valid JSON ({error}); fix or regenerate the file"
        ) from None


def load_quant_config(
    checkpoint_dir: str | Path, override_activation: ActivationOverride | None = None
) -> QuantConfig:
    """The :class:`QuantConfig` of a checkpoint directory, found as vLLM finds it.

    ``config.json``'s ``quantization_config`` wins when its ``quant_method`` is "modelopt" or
    "compressed-tensors" (compressed-tensors' ModelOpt converter leaves a stale
    ``hf_quant_config.json`` beside it); otherwise ``hf_quant_config.json`` (ModelOpt, also
    older exports whose config.json lacks quant_method). ``override_activation="none"`` serves
    every W4A4 layer weight-only. Raises CheckpointFormatError when no file holds a quantization
    config, for malformed JSON, an unknown quant_method or quant_algo, or an unsupported group.
    """
    directory = Path(checkpoint_dir)
    path = directory / CONFIG
    data = read_json(path) if path.is_file() else {}
    section = data.get("quantization_config") if isinstance(data, dict) else None
    method = section.get("quant_method") if isinstance(section, dict) else None
    source = f"{path}: quantization_config"
    if method == "modelopt":
        config = modelopt.parse_quantization_config(section, source)
    elif method == "compressed-tensors":
        config = compressed_tensors.parse_quantization_config(section, source)
    elif (directory / HF_QUANT_CONFIG).is_file():
        path = directory / HF_QUANT_CONFIG
        config = modelopt.parse_hf_quant_config(read_json(path), str(path))
    elif section is not None:
        raise CheckpointFormatError(
            f'{source}: quant_method {method!r} is not supported; quantoracle reads "modelopt" '
            'and "compressed-tensors"'
        )
    else:
        raise CheckpointFormatError(
            f"{directory}: no quantization config: expected {HF_QUANT_CONFIG} or a {CONFIG} with "
            "quantization_config; quantize the model first (quantize_checkpoint)"
        )
    return config.with_override(override_activation)


__all__ = ["load_quant_config", "read_json", "HF_QUANT_CONFIG", "CONFIG"]
