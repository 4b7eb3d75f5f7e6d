"""Find and parse the quantization config of a checkpoint directory."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from quantoracle.errors import CheckpointFormatError, CheckpointPathError, UnquantizedModelError
from quantoracle.schemes.checkpoint import compressed_tensors, modelopt
from quantoracle.schemes.checkpoint.config import ActivationOverride, QuantConfig

HF_QUANT_CONFIG = "hf_quant_config.json"
CONFIG = "config.json"
QUANT_METHODS = ("modelopt", "compressed-tensors")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def read_json(path: Path) -> Any:
    """The parsed JSON of ``path``; CheckpointFormatError (naming the file and the position)
    when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointFormatError(
            f"{path}: not valid JSON ({error}); fix or regenerate the file"
        ) from None


def model_directory(path: str | Path) -> Path:
    """``path`` as a directory, or CheckpointPathError saying what it is instead: missing (with
    how to download it when it reads as a Hugging Face hub id ``org/name``: hub ids are not
    fetched), or a file."""
    directory = Path(path)
    if directory.is_dir():
        return directory
    if directory.exists():
        raise CheckpointPathError(
            f"{directory} is a file; pass the directory that holds the checkpoint "
            f"({directory.parent}), not one of its files"
        )
    if _HUB_ID.fullmatch(str(path)):
        raise CheckpointPathError(
            f"{path}: no such directory. If it is a Hugging Face hub id: quantoracle does not "
            f"download models; run `huggingface-cli download {path} --local-dir DIR` (or "
            f"`hf download {path} --local-dir DIR`) and pass DIR"
        )
    raise CheckpointPathError(f"{directory} does not exist; pass a checkpoint directory")


def load_quant_config(
    checkpoint_dir: str | Path, override_activation: ActivationOverride | None = None
) -> QuantConfig:
    """The :class:`QuantConfig` of a checkpoint directory, found as vLLM finds it.

    ``config.json``'s ``quantization_config`` decides when it names a ``quant_method``:
    "modelopt" or "compressed-tensors" is read from there (compressed-tensors' ModelOpt
    converter leaves a stale ``hf_quant_config.json`` beside it), any other method is refused
    even when an ``hf_quant_config.json`` is present. Without a quant_method (older ModelOpt
    exports) ``hf_quant_config.json`` is read. ``override_activation="none"`` serves every W4A4
    layer weight-only.

    Raises CheckpointPathError for a path that is missing (or a hub id), a file, or a directory
    without config.json or hf_quant_config.json; UnquantizedModelError for a 16-bit model;
    CheckpointFormatError for malformed JSON, an unknown quant_method or quant_algo, or an
    unsupported group.
    """
    directory = model_directory(checkpoint_dir)
    path, hf_path = directory / CONFIG, directory / HF_QUANT_CONFIG
    data = read_json(path) if path.is_file() else {}
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object, found {data!r:.80}")
    section = data.get("quantization_config")
    method = section.get("quant_method") if isinstance(section, dict) else None
    source = f"{path}: quantization_config"
    if method == "modelopt":
        config = modelopt.parse_quantization_config(section, source)
    elif method == "compressed-tensors":
        config = compressed_tensors.parse_quantization_config(section, source)
    elif method is not None:
        beside = (
            f"; {hf_path} is not read in its place, as config.json decides (vLLM's rule): if the "
            f'model is ModelOpt\'s, set quant_method to "modelopt" or remove quantization_config'
            if hf_path.is_file()
            else ""
        )
        raise CheckpointFormatError(
            f"{source}: quant_method {method!r} is not supported; quantoracle reads "
            f"{' and '.join(map(repr, QUANT_METHODS))}{beside}"
        )
    elif hf_path.is_file():
        config = modelopt.parse_hf_quant_config(read_json(hf_path), str(hf_path))
    elif section is not None:
        raise CheckpointFormatError(
            f"{source}: no quant_method; expected one of {', '.join(map(repr, QUANT_METHODS))}"
        )
    elif path.is_file():
        raise UnquantizedModelError(
            f"{directory} is a 16-bit model, with no quantization config ({CONFIG} has no "
            f"quantization_config and there is no {HF_QUANT_CONFIG}); quantize it first: "
            f"`quantoracle quantize {directory} OUT_DIR`"
        )
    else:
        raise CheckpointPathError(
            f"{directory}: no {CONFIG} or {HF_QUANT_CONFIG}; pass a model directory as "
            "transformers, ModelOpt or llm-compressor write it"
        )
    return config.with_override(override_activation)


__all__ = [
    "load_quant_config",
    "model_directory",
    "read_json",
    "HF_QUANT_CONFIG",
    "CONFIG",
    "QUANT_METHODS",
]
