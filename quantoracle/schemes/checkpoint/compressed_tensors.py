"""compressed-tensors' quantization config (``config.json``'s ``quantization_config`` with
``quant_method: compressed-tensors``), docs/numerics.md.

A group is NVFP4 when its weights have 4 bits, type float, strategy tensor_group, group_size 16
and are symmetric (vLLM's rule); W4A4 when its input_activations match the same rule, NVFP4A16
when they are null. Groups must be stored ``nvfp4-pack-quantized``; other groups (FP8, INT4)
are refused with CheckpointFormatError. Unknown keys are ignored.
"""

from __future__ import annotations

from typing import Any

from quantoracle.errors import CheckpointFormatError
from quantoracle.schemes import keys as k
from quantoracle.schemes.checkpoint.config import QuantConfig
from quantoracle.schemes.scheme import W4A4_NVFP4, W4A16_NVFP4, Scheme

NVFP4_FORMAT = "nvfp4-pack-quantized"
VERSION = "0.20.0"  # the compressed-tensors release whose serialization this follows

_NVFP4_ARGS = {
    "num_bits": 4,
    "type": "float",
    "strategy": "tensor_group",
    "group_size": k.NVFP4_BLOCK,
}


def _require_nvfp4(source: str, where: str, args: Any) -> None:
    if not isinstance(args, dict):
        raise CheckpointFormatError(f"{source}: {where} must be an object, found {args!r}")
    found = {key: args.get(key) for key in _NVFP4_ARGS}
    if found != _NVFP4_ARGS or args.get("symmetric", True) is not True:
        raise CheckpointFormatError(
            f"{source}: {where} is {found}, symmetric={args.get('symmetric', True)}; quantoracle "
            f"reads NVFP4 groups only: {_NVFP4_ARGS}, symmetric"
        )


def _scheme_of_group(source: str, name: str, group: Any, default_format: Any) -> Scheme:
    if not isinstance(group, dict):
        raise CheckpointFormatError(
            f"{source}: config_groups.{name} must be an object, found {group!r}"
        )
    _require_nvfp4(source, f"config_groups.{name}.weights", group.get("weights"))
    stored_as = group.get("format") or default_format
    if stored_as != NVFP4_FORMAT:
        raise CheckpointFormatError(
            f"{source}: config_groups.{name} is NVFP4 stored as format {stored_as!r}; quantoracle "
            f"reads packed NVFP4 only ({NVFP4_FORMAT!r})"
        )
    if group.get("input_activations") is None:
        return W4A16_NVFP4
    _require_nvfp4(source, f"config_groups.{name}.input_activations", group["input_activations"])
    return W4A4_NVFP4


def parse_quantization_config(data: Any, source: str) -> QuantConfig:
    """A :class:`QuantConfig` from a compressed-tensors ``quantization_config``.

    Targets: ``"Linear"`` sets the default scheme, ``"re:<regex>"`` adds a pattern, a dotted
    module name an exact entry; ``ignore`` entries (names or ``re:``) are the excludes. Raises
    CheckpointFormatError for unsupported groups, two groups targeting "Linear", or other class
    names as targets.
    """
    if not isinstance(data, dict) or not isinstance(data.get("config_groups"), dict):
        raise CheckpointFormatError(f"{source}: quantization_config needs a config_groups object")
    default: Scheme | None = None
    layers: dict[str, Scheme] = {}
    patterns: list[tuple[str, Scheme]] = []
    for name, group in data["config_groups"].items():
        scheme = _scheme_of_group(source, name, group, data.get("format"))
        targets = group.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise CheckpointFormatError(
                f"{source}: config_groups.{name}.targets must be a list of strings"
            )
        for target in targets:
            if target == "Linear":
                if default is not None:
                    raise CheckpointFormatError(f'{source}: two config_groups target "Linear"')
                default = scheme
            elif target.startswith("re:"):
                patterns.append((target, scheme))
            elif "." in target:
                layers[target] = scheme
            else:
                raise CheckpointFormatError(
                    f"{source}: config_groups.{name} targets module class {target!r}; quantoracle "
                    'resolves "Linear", module names and "re:" patterns only'
                )
    ignore = data.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(v, str) for v in ignore):
        raise CheckpointFormatError(
            f"{source}: ignore must be a list of module names, found {ignore!r}"
        )
    return QuantConfig(
        "compressed-tensors",
        source,
        default,
        layers=layers,
        patterns=tuple(patterns),
        exclude=tuple(ignore),
    )


def quantization_config(scheme: Scheme, exclude: list[str]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for one NVFP4 scheme, as compressed-tensors 0.20
    serializes its NVFP4 (W4A4) and NVFP4A16 presets."""
    weights = {
        "num_bits": 4,
        "type": "float",
        "strategy": "tensor_group",
        "group_size": k.NVFP4_BLOCK,
        "symmetric": True,
        "dynamic": False,
        "scale_dtype": "torch.float8_e4m3fn",
    }
    activations = (
        None if scheme.weight_only else {**weights, "dynamic": "local", "observer": "static_minmax"}
    )
    return {
        "quant_method": "compressed-tensors",
        "format": NVFP4_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "format": NVFP4_FORMAT,
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": activations,
                "output_activations": None,
            }
        },
        "ignore": list(exclude),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": VERSION,
    }


__all__ = ["parse_quantization_config", "quantization_config", "NVFP4_FORMAT"]
