"""ModelOpt's quantization config: ``hf_quant_config.json`` and ``config.json``'s
``quantization_config`` with ``quant_method: modelopt`` (docs/numerics.md).

Parsing gives a :class:`QuantConfig`; :func:`hf_quant_config` and :func:`quantization_config`
write the two files' content for an NVFP4 checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from quantoracle.errors import CheckpointFormatError
from quantoracle.schemes import keys as k
from quantoracle.schemes import scheme as s
from quantoracle.schemes.checkpoint.config import QuantConfig
from quantoracle.schemes.scheme import Scheme

PRODUCER = {"name": "quantoracle", "version": "0.1.0"}
NVFP4_GROUP_SIZE = k.NVFP4_BLOCK

QUANT_ALGOS: dict[str, Scheme] = {
    "NVFP4": s.W4A4_NVFP4,
    "W4A16_NVFP4": s.W4A16_NVFP4,
    "FP8": s.W8A8_FP8,
    "FP8_PER_CHANNEL_PER_TOKEN": s.W8A8_FP8_DYNAMIC,
    "FP8_PB_WO": Scheme(weight=k.FP8_WEIGHT_BLOCK128),
}
"""ModelOpt ``quant_algo`` -> scheme. MIXED_PRECISION names a per-layer algo instead."""
ALGO_OF: dict[Scheme, str] = {scheme: algo for algo, scheme in QUANT_ALGOS.items()}
MIXED_PRECISION = "MIXED_PRECISION"


def _scheme_of_algo(source: str, where: str, entry: Mapping[str, Any]) -> Scheme:
    algo = str(entry.get("quant_algo") or "").upper()
    if algo not in QUANT_ALGOS:
        raise CheckpointFormatError(
            f"{source}: {where}quant_algo {entry.get('quant_algo')!r} is not supported; "
            f"quantoracle reads {', '.join([*QUANT_ALGOS, MIXED_PRECISION])}"
        )
    scheme = QUANT_ALGOS[algo]
    group_size = entry.get("group_size")
    if scheme.weight == k.NVFP4_WEIGHT and group_size not in (None, NVFP4_GROUP_SIZE):
        raise CheckpointFormatError(
            f"{source}: {where}group_size {group_size!r} with quant_algo {algo}; NVFP4 blocks are "
            f"{NVFP4_GROUP_SIZE} elements"
        )
    return scheme


def _string_list(source: str, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointFormatError(
            f"{source}: {key} must be a list of module-name globs, found {value!r}"
        )
    return tuple(value)


def _parse(source: str, section: Mapping[str, Any], exclude_key: str) -> QuantConfig:
    exclude = _string_list(source, exclude_key, section.get(exclude_key))
    if str(section.get("quant_algo") or "").upper() != MIXED_PRECISION:
        return QuantConfig(
            "modelopt", source, _scheme_of_algo(source, "", section), exclude=exclude
        )
    layers = section.get("quantized_layers")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise CheckpointFormatError(
            f"{source}: quant_algo MIXED_PRECISION needs quantized_layers, a mapping from module "
            f'name to {{"quant_algo": ...}}; found {layers!r}'
        )
    schemes = {
        name: _scheme_of_algo(source, f"quantized_layers[{name!r}]: ", v)
        for name, v in layers.items()
    }
    return QuantConfig("modelopt", source, None, layers=schemes, exclude=exclude)


def parse_hf_quant_config(data: Any, source: str) -> QuantConfig:
    """A :class:`QuantConfig` from ``hf_quant_config.json``'s content
    (``{"producer": ..., "quantization": {"quant_algo": ..., "exclude_modules": [...], ...}}``).
    Raises CheckpointFormatError naming ``source`` for a missing section or an unknown algo."""
    section = data.get("quantization") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise CheckpointFormatError(
            f'{source}: expected an object with a "quantization" object holding quant_algo'
        )
    return _parse(source, section, "exclude_modules")


def parse_quantization_config(data: Any, source: str) -> QuantConfig:
    """A :class:`QuantConfig` from ``config.json``'s ``quantization_config`` with
    ``quant_method: modelopt`` (quant_algo, ``ignore`` as the excludes, group_size at the top or
    in config_groups.group_0.weights; MIXED_PRECISION adds quantized_layers)."""
    if not isinstance(data, dict):
        raise CheckpointFormatError(
            f"{source}: quantization_config must be an object, found {data!r}"
        )
    section = dict(data)
    if "group_size" not in section:
        weights = ((data.get("config_groups") or {}).get("group_0") or {}).get("weights") or {}
        section["group_size"] = weights.get("group_size") if isinstance(weights, dict) else None
    return _parse(source, section, "ignore")


def hf_quant_config(scheme: Scheme, exclude: list[str]) -> dict[str, Any]:
    """``hf_quant_config.json`` for a checkpoint of one NVFP4 scheme, as ModelOpt writes it."""
    return {
        "producer": dict(PRODUCER),
        "quantization": {
            "quant_algo": ALGO_OF[scheme],
            "kv_cache_quant_algo": None,
            "group_size": NVFP4_GROUP_SIZE,
            "exclude_modules": list(exclude),
        },
    }


def quantization_config(scheme: Scheme, exclude: list[str]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for a checkpoint of one NVFP4 scheme."""
    args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_GROUP_SIZE}
    group: dict[str, Any] = {"weights": dict(args)}
    if not scheme.weight_only:
        group["input_activations"] = dict(args)
    group["targets"] = ["Linear"]
    return {
        "quant_method": "modelopt",
        "quant_algo": ALGO_OF[scheme],
        "ignore": list(exclude),
        "config_groups": {"group_0": group},
        "producer": dict(PRODUCER),
    }


__all__ = [
    "QUANT_ALGOS",
    "parse_hf_quant_config",
    "parse_quantization_config",
    "hf_quant_config",
    "quantization_config",
]
