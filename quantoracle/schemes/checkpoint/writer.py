"""Quantize a 16-bit model's state dict to NVFP4 and write it as a ModelOpt or compressed-tensors
checkpoint: sharded safetensors, their index, and the quantization config.

What is quantized: every 2-D ``<module>.weight`` whose module matches no ``exclude`` pattern,
and transformers-5 fused experts (``<p>.experts.gate_up_proj`` [E, 2I, H], gate rows first;
``<p>.experts.down_proj`` [E, H, I]), which are written per expert. Everything else is copied.
Groups that serving engines fuse share one ``weight_scale_2`` (the max amax) and one
``input_scale``: q/k/v, gate/up (or w1/w3) of an MLP or of one expert (FORMATS.md section 2).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from quantoracle.errors import CheckpointFormatError, NumericsError, SchemeError
from quantoracle.schemes import nvfp4
from quantoracle.schemes.checkpoint import compressed_tensors, modelopt
from quantoracle.schemes.checkpoint.config import matches
from quantoracle.schemes.checkpoint.detect import CONFIG, HF_QUANT_CONFIG, read_json
from quantoracle.schemes.checkpoint.layout import (
    EXPERT_MODULE,
    FORMATS,
    FUSED_EXPERTS,
    LAYOUTS,
    SAVED_NAMES,
    SHARED_SCALE_GROUPS,
    Format,
    TensorLayout,
)
from quantoracle.schemes.checkpoint.storage import INDEX, SafetensorsDirectory
from quantoracle.schemes.keys import NVFP4_BLOCK
from quantoracle.schemes.scheme import W4A4_NVFP4, W4A16_NVFP4, Scheme

DEFAULT_EXCLUDE: tuple[str, ...] = (
    "lm_head",
    "*embed_tokens",
    "*.mlp.gate",
    "*.block_sparse_moe.gate",
    "*.mlp.shared_expert_gate",
)
"""Module-name patterns (fnmatch globs, or ``re:<regex>``) left 16-bit by default: the output
head, embeddings and MoE routers."""
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
WEIGHT = ".weight"


@dataclass(frozen=True)
class _Unit:
    """One step of the pass. ``groups``: the output modules quantized here, each group sharing
    one scale_2 and input_scale; empty for a tensor copied as is. ``source``: the tensor copied,
    or the fused experts tensor split into ``groups`` (one per expert, its rows divided among the
    group); None when each module reads its own ``<module>.weight``."""

    source: str | None
    groups: tuple[tuple[str, ...], ...] = ()


def _expert_names(
    prefix: str, param: str, experts: int, layout: TensorLayout
) -> tuple[tuple[str, ...], ...]:
    """Per-expert output modules of a fused parameter: (gate, up) or (down,) for each expert."""
    mixtral = layout.format == "modelopt" and prefix.endswith("block_sparse_moe.experts")
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    projections = names[:2] if param == "gate_up_proj" else names[2:]
    return tuple(tuple(f"{prefix}.{e}.{p}" for p in projections) for e in range(experts))


def _siblings(module: str, present: set[str]) -> tuple[str, ...]:
    """The shared-scale group of ``module`` (q/k/v, gate/up, w1/w3) among ``present``."""
    base, dot, leaf = module.rpartition(".")
    group = next((g for g in SHARED_SCALE_GROUPS if leaf in g), (leaf,))
    return tuple(m for m in (base + dot + s for s in group) if m in present or m == module)


class _Pass:
    """One quantization pass over ``tensors``: planned and checked (schemes, excludes, shapes,
    input amax) before anything is read or written; :meth:`items` then runs it."""

    def __init__(self, tensors, scheme, format, exclude, input_amax, config):
        if isinstance(scheme, str):
            scheme = Scheme.from_name(scheme)
        if scheme not in (W4A16_NVFP4, W4A4_NVFP4):
            raise SchemeError(f"scheme {scheme}: quantoracle writes w4a16_nvfp4 or w4a4_nvfp4")
        if format not in FORMATS:
            raise CheckpointFormatError(
                f"format {format!r}: quantoracle writes {' or '.join(FORMATS)}"
            )
        self.tensors, self.scheme, self.layout = tensors, scheme, LAYOUTS[format]
        renames = SAVED_NAMES.get((config or {}).get("model_type"), ())
        self.source = {reduce(lambda n, r: n.replace(*r), renames, n): n for n in tensors}
        self.exclude = tuple(exclude)
        self.excluded: list[str] = []  # module names written 16-bit, for the config
        self.units = self._plan()
        self.input_amax = input_amax or {}
        self._check_input_amax()

    def _shape(self, name: str) -> list[int]:
        """The shape of output tensor ``name``'s source."""
        if isinstance(self.tensors, SafetensorsDirectory):
            return self.tensors.header(self.source[name])[1]  # without reading the data
        return list(self.tensors[self.source[name]].shape)

    def _tensor(self, name: str) -> torch.Tensor:
        return self.tensors[self.source[name]]

    def _excluded(self, what: str, members: tuple[str, ...]) -> bool:
        """Whether ``members``, served as one layer, are excluded: all or none, else SchemeError."""
        flags = {m: any(matches(m, p) for p in self.exclude) for m in members}
        if len(set(flags.values())) > 1:
            raise SchemeError(
                f"exclude matches {sorted(m for m, f in flags.items() if f)} but not all of "
                f"{what}, which serving engines run as one layer; exclude all of them or none"
            )
        return all(flags.values())

    def _plan(self) -> list[_Unit]:
        names = list(self.source)
        linear = {
            n[: -len(WEIGHT)] for n in names if n.endswith(WEIGHT) and len(self._shape(n)) == 2
        }
        blocks: dict[str, list[str]] = defaultdict(list)
        for module in linear:
            expert = EXPERT_MODULE.match(module)
            if expert:
                blocks[expert["prefix"]].append(module)
        excluded = {m for m in linear if any(matches(m, p) for p in self.exclude)}
        for prefix, members in blocks.items():
            self._excluded(f"the experts of {prefix}", tuple(sorted(members)))
        for module in linear:
            group = _siblings(module, linear)
            self._excluded(" / ".join(group), group)
        quantized = linear - excluded
        bad = sorted(m for m in quantized if self._shape(m + WEIGHT)[1] % NVFP4_BLOCK)
        if bad:
            raise NumericsError(
                f"K (in features) is not a multiple of {NVFP4_BLOCK} for {bad[:8]}; NVFP4 cannot "
                "quantize them: add them to exclude"
            )
        self.excluded = sorted(excluded)
        units: list[_Unit] = []
        done: set[str] = set()
        for name in names:
            module = name[: -len(WEIGHT)]
            fused = FUSED_EXPERTS.match(name)
            if fused and len(self._shape(name)) == 3:
                units.append(self._fused(name, fused["prefix"], fused["param"]))
            elif name.endswith(WEIGHT) and module in quantized:
                if module not in done:
                    group = _siblings(module, quantized)
                    done.update(group)
                    units.append(_Unit(None, (group,)))
            else:
                units.append(_Unit(name))
        return units

    def _fused(self, name: str, prefix: str, param: str) -> _Unit:
        experts, rows, cols = self._shape(name)
        groups = _expert_names(prefix, param, experts, self.layout)
        if any(matches(prefix, p) for p in self.exclude):
            self.excluded.append(prefix)
            return _Unit(name)
        self._excluded(f"the experts of {prefix}", tuple(m for g in groups for m in g))
        if cols % NVFP4_BLOCK or rows % len(groups[0]):
            raise NumericsError(
                f"{name} is [E, R, K] = {[experts, rows, cols]}: expected K a multiple of "
                f"{NVFP4_BLOCK} and R = {len(groups[0])} x the intermediate size"
            )
        return _Unit(name, groups)

    def _check_input_amax(self) -> None:
        if self.scheme.weight_only:
            return
        needed = [m for u in self.units for g in u.groups for m in g]
        missing = [m for m in needed if m not in self.input_amax]
        if missing:
            raise SchemeError(
                f"w4a4_nvfp4 needs the calibrated input amax of every quantized module; "
                f"input_amax lacks {len(missing)} of {len(needed)}, e.g. {missing[:4]}. Calibrate "
                "(record max |input| per module) or write w4a16_nvfp4"
            )

    def items(self, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the output state dict, unit by unit."""
        for unit in tqdm(self.units, desc="quantize", unit="tensor", disable=not progress):
            if not unit.groups:
                yield unit.source, self._tensor(unit.source)
            elif unit.source is None:
                group = unit.groups[0]
                yield from self._quantize(group, [self._tensor(m + WEIGHT) for m in group])
            else:
                fused = self._tensor(unit.source)
                for e, group in enumerate(unit.groups):
                    yield from self._quantize(group, list(fused[e].chunk(len(group))))

    def _quantize(
        self, group: tuple[str, ...], weights: list[torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """One shared-scale group: scale_2 from the max amax, input_scale from the max input
        amax; globals stored in the format's convention and the weights quantized with the
        scale a reader gets back from them (1/(1/x) for compressed-tensors)."""
        layout = self.layout
        try:
            amax = torch.stack([w.abs().amax().float() for w in weights]).amax()
            weight_global = layout.stored(nvfp4.global_scale(amax))
            outputs = [nvfp4.quantize_weight(w, layout.scale(weight_global))[:2] for w in weights]
            input_global = None
            if not self.scheme.weight_only:
                input_amax = max(float(self.input_amax[m]) for m in group)
                input_global = layout.stored(nvfp4.global_scale(input_amax))
        except NumericsError as error:
            raise NumericsError(f"{' / '.join(group)}: {error}") from None
        for module, (packed, block_scale) in zip(group, outputs):
            yield f"{module}.{layout.packed}", packed
            yield f"{module}.{layout.block_scale}", block_scale
            yield f"{module}.{layout.weight_global}", weight_global
            if input_global is not None:
                yield f"{module}.{layout.input_global}", input_global

    def config_files(self, config: Mapping[str, Any] | None) -> dict[str, Any]:
        """File name -> JSON content: the quantization config (and config.json)."""
        files: dict[str, Any] = {}
        if self.layout.format == "modelopt":
            files[HF_QUANT_CONFIG] = modelopt.hf_quant_config(self.scheme, self.excluded)
            section = modelopt.quantization_config(self.scheme, self.excluded)
        else:
            section = compressed_tensors.quantization_config(self.scheme, self.excluded)
        if config is not None or self.layout.format == "compressed-tensors":
            files[CONFIG] = {**(config or {}), "quantization_config": section}
        return files


def quantize_state_dict(
    tensors: Mapping[str, torch.Tensor],
    scheme: Scheme | str,
    format: Format = "modelopt",
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    input_amax: Mapping[str, float] | None = None,
    config: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The quantized state dict, in memory, with the tensor names and layout of ``format``.

    ``tensors``: a 16-bit state dict (see the module docstring for what is quantized).
    ``scheme``: W4A16_NVFP4 or W4A4_NVFP4 (or their names). ``exclude``: module-name patterns
    kept 16-bit. ``input_amax``: module name -> calibrated max |input|, required for every
    quantized module under W4A4 (input_scale = amax / 2688, the group max for fused groups).
    ``config``: the model's config.json content; its ``model_type`` restores saved module names
    that transformers 5 renames in memory (Mixtral's ``mlp`` is saved as ``block_sparse_moe``,
    its experts as w1/w3/w2 in ModelOpt). ``exclude`` and ``input_amax`` use the saved names.
    Raises SchemeError (unsupported scheme, missing input amax, an exclude that splits a fused
    group), NumericsError (K % 16 != 0, NaN or Inf weights), CheckpointFormatError (bad format).
    """
    quantization = _Pass(tensors, scheme, format, exclude, input_amax, config)
    return dict(quantization.items(progress))


@contextlib.contextmanager
def _atomic_directory(dst: Path) -> Iterator[Path]:
    """A fresh temporary directory beside ``dst``, renamed to ``dst`` when the block succeeds
    and removed when it fails: no half-written checkpoint is ever left at ``dst``."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(
            f"{dst} exists and is not an empty directory; choose a new path or remove it"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            dst.rmdir()
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_shards(
    directory: Path, items: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int
) -> None:
    """Safetensors shards of at most ``max_shard_bytes`` (a larger tensor gets a shard of its
    own), named as transformers names them, plus the index when there is more than one."""
    shards: list[list[str]] = []
    total = 0
    current: dict[str, torch.Tensor] = {}
    current_bytes = 0
    storages: set[int] = set()

    def flush() -> None:
        shards.append(list(current))
        save_file(
            current, str(directory / f"shard-{len(shards)}.partial"), metadata={"format": "pt"}
        )
        current.clear()
        storages.clear()

    for name, tensor in items:
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            flush()
            current_bytes = 0
        tensor = tensor.detach().contiguous()
        if tensor.untyped_storage().data_ptr() in storages:  # tied weights, shared globals
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        current[name] = tensor
        current_bytes += size
        total += size
    if current or not shards:
        flush()
    if len(shards) == 1:
        os.rename(directory / "shard-1.partial", directory / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.rename(directory / f"shard-{i}.partial", directory / file)
        weight_map.update(dict.fromkeys(names, file))
    _dump(
        directory / INDEX,
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_into(
    directory: Path, quantization: _Pass, max_shard_bytes: int, config, progress: bool
) -> None:
    _write_shards(directory, quantization.items(progress), max_shard_bytes)
    for file, content in quantization.config_files(config).items():
        _dump(directory / file, content)


def write_checkpoint(
    dst_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    scheme: Scheme | str,
    format: Format = "modelopt",
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    input_amax: Mapping[str, float] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Quantize ``tensors`` (see :func:`quantize_state_dict`, also for ``config``) and write a
    checkpoint to ``dst_dir``, which must not exist or be empty.

    Writes ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` plus ``model.safetensors.index.json``) and, for ModelOpt,
    ``hf_quant_config.json``; ``config.json`` (``config`` with ``quantization_config`` added)
    when ``config`` is given, and always for compressed-tensors. Everything is written to a
    temporary directory renamed at the end. Returns the path. Raises like quantize_state_dict,
    and FileExistsError for a non-empty ``dst_dir``.
    """
    quantization = _Pass(tensors, scheme, format, exclude, input_amax, config)
    dst = Path(dst_dir)
    with _atomic_directory(dst) as tmp:
        _write_into(tmp, quantization, max_shard_bytes, config, progress)
    return dst


def quantize_checkpoint(
    src_dir: str | Path,
    dst_dir: str | Path,
    scheme: Scheme | str,
    format: Format = "modelopt",
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    input_amax: Mapping[str, float] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Quantize a 16-bit model directory (``config.json`` + safetensors) into ``dst_dir``.

    Tensors are read one unit at a time; other files (tokenizer, generation config) are copied;
    ``config.json`` gains ``quantization_config``. Raises CheckpointFormatError when the source
    has no config.json or is already quantized, and like :func:`write_checkpoint`.
    """
    src = Path(src_dir)
    if not (src / CONFIG).is_file():
        raise CheckpointFormatError(
            f"{src}: no {CONFIG}; quantize_checkpoint reads a transformers model directory"
        )
    config = read_json(src / CONFIG)
    if (
        not isinstance(config, dict)
        or "quantization_config" in config
        or (src / HF_QUANT_CONFIG).exists()
    ):
        raise CheckpointFormatError(
            f"{src}: {CONFIG} is not a 16-bit model's config (it is not an object, or the model is "
            "already quantized); pass the original model"
        )
    tensors = SafetensorsDirectory(src)
    try:
        quantization = _Pass(tensors, scheme, format, exclude, input_amax, config)
        dst = Path(dst_dir)
        with _atomic_directory(dst) as tmp:
            for file in src.iterdir():
                if (
                    file.is_file()
                    and file.suffix != ".safetensors"
                    and file.name not in (INDEX, CONFIG)
                ):
                    shutil.copy2(file, tmp / file.name)
            _write_into(tmp, quantization, max_shard_bytes, config, progress)
    finally:
        tensors.close()
    return dst


__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_MAX_SHARD_BYTES",
    "quantize_state_dict",
    "write_checkpoint",
    "quantize_checkpoint",
]
