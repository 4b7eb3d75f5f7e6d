"""Quantize a 16-bit model's state dict to NVFP4 and write it as a ModelOpt or compressed-tensors
checkpoint: sharded safetensors, their index, and the quantization config.

What is quantized: every 2-D ``<module>.weight`` whose module matches no ``exclude`` pattern,
and transformers-5 fused experts (``<p>.experts.gate_up_proj`` [E, 2I, H], gate rows first;
``<p>.experts.down_proj`` [E, H, I]), which are written per expert. Everything else is copied.
Groups that serving engines fuse share one ``weight_scale_2`` (the max amax) and one
``input_scale``: q/k/v, gate/up (or w1/w3) of an MLP or of one expert (docs/numerics.md).

Writes are atomic: everything goes to ``.<OUT>.partial-<host>-<pid>-<token>`` beside ``OUT``,
renamed to ``OUT`` at the end and removed on failure, Ctrl-C or SIGTERM. A later write to
``OUT`` removes the partial directories a killed writer left (see :func:`_remove_stale_partials`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from quantoracle.errors import (
    CheckpointFormatError,
    CheckpointPathError,
    NumericsError,
    SchemeError,
)
from quantoracle.schemes import nvfp4
from quantoracle.schemes.checkpoint import compressed_tensors, modelopt
from quantoracle.schemes.checkpoint.config import matches
from quantoracle.schemes.checkpoint.detect import (
    CONFIG,
    HF_QUANT_CONFIG,
    model_directory,
    read_json,
)
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
"""Module-name patterns (fnmatch globs, or ``re:<regex>``) always left 16-bit unless
``default_exclude=False``: the output head, embeddings and MoE routers. (Norms, biases and
other tensors that are not 2-D weights are never quantized.)"""
SIDE_FILES: tuple[str, ...] = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "configuration_*.py",
    "modeling_*.py",
    "tokenization_*.py",
    "processing_*.py",
    "image_processing_*.py",
    "LICENSE*",
    "NOTICE*",
)
"""fnmatch patterns of the files :func:`quantize_checkpoint` copies beside the weights: what
loading and serving the model needs (generation config, tokenizer, chat template, processor
configs, remote code) and its license. Other files are skipped and reported."""
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
WEIGHT = ".weight"
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class QuantizeSummary:
    """What a write produced. :meth:`describe` renders it for people.

    - ``directory``: the checkpoint written; ``format`` and ``scheme``.
    - ``quantized``: the modules written NVFP4 (experts one per expert and projection).
    - ``kept``: module -> the exclude pattern that kept it 16-bit (a fused experts parameter
      kept whole appears as its block prefix).
    - ``unchanged_tensors``: how many tensors were copied as they were (the kept modules',
      norms, biases, ...).
    - ``bytes_before`` / ``bytes_after``: bytes of the tensors read and of the tensors written.
    - ``copied_files``: side files copied (:data:`SIDE_FILES`); ``skipped_files``: the source's
      other files and folders (``name/``), not copied; ``ignored_files``: ``*.safetensors``
      files that are not the model's (see :class:`SafetensorsDirectory`), not read.
    - ``removed_partials``: partial directories of killed writes to the same path, removed.

    Where a path is expected it stands for ``directory`` (``os.fspath``, ``str``, ``/``): the
    writers returned the path before they returned this.
    """

    directory: Path
    format: Format
    scheme: Scheme
    quantized: tuple[str, ...]
    kept: Mapping[str, str]
    unchanged_tensors: int
    bytes_before: int
    bytes_after: int
    copied_files: tuple[str, ...] = ()
    skipped_files: tuple[str, ...] = ()
    ignored_files: tuple[str, ...] = ()
    removed_partials: tuple[Path, ...] = ()

    def __fspath__(self) -> str:
        return os.fspath(self.directory)

    def __str__(self) -> str:
        return str(self.directory)

    def __truediv__(self, name: str | Path) -> Path:
        return self.directory / name

    def __repr__(self) -> str:
        return (
            f"QuantizeSummary({str(self.directory)!r}, {self.format}, {self.scheme}, "
            f"quantized={len(self.quantized)}, kept={len(self.kept)}, "
            f"bytes {self.bytes_before} -> {self.bytes_after})"
        )

    def describe(self) -> str:
        """Several lines: what was quantized and kept (module names with their numbers as
        ``*``, counted), sizes, files copied, skipped and ignored, partial directories removed."""
        lines = [f"wrote a {self.format} {self.scheme} checkpoint to {self.directory}"]
        lines.append(f"quantized {len(self.quantized)} modules:")
        lines += [f"  {name}" for name in _grouped(self.quantized)]
        if self.kept:
            lines.append(f"kept 16-bit {len(self.kept)} modules, by exclude pattern:")
            for pattern in sorted(set(self.kept.values())):
                names = [m for m, p in self.kept.items() if p == pattern]
                lines += [f"  {name}  ({pattern!r})" for name in _grouped(names)]
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        lines.append(
            f"tensors: {_size(self.bytes_before)} -> {_size(self.bytes_after)} ({ratio:.1f}x "
            f"smaller); {self.unchanged_tensors} tensors copied unchanged"
        )
        for label, files in (
            ("copied", self.copied_files),
            ("skipped (not a known side file)", self.skipped_files),
            ("ignored (not the model's safetensors)", self.ignored_files),
        ):
            if files:
                lines.append(f"{label}: {', '.join(files)}")
        lines += [
            f"removed {path}, left by a killed write to the same path"
            for path in self.removed_partials
        ]
        return "\n".join(lines)


def _grouped(names: Sequence[str]) -> list[str]:
    """Names with their numbers replaced by ``*``, counted when more than one share a form."""
    forms: dict[str, list[str]] = defaultdict(list)
    for name in names:
        forms[re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)].append(name)
    return [m[0] if len(m) == 1 else f"{form}  x{len(m)}" for form, m in forms.items()]


def _size(count: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


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

    def __init__(self, tensors, scheme, format, exclude, default_exclude, input_amax, config):
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
        if isinstance(exclude, str):
            raise SchemeError(
                f"exclude={exclude!r} is one string; pass a sequence of patterns: ({exclude!r},)"
            )
        self.exclude = (*DEFAULT_EXCLUDE, *exclude) if default_exclude else tuple(exclude)
        self.excluded: dict[str, str] = {}  # module written 16-bit -> the pattern that kept it
        self.bytes_read = 0
        self.units = self._plan()
        self.input_amax = input_amax or {}
        self._check_input_amax()

    def _shape(self, name: str) -> list[int]:
        """The shape of output tensor ``name``'s source."""
        if isinstance(self.tensors, SafetensorsDirectory):
            return self.tensors.header(self.source[name])[1]  # without reading the data
        return list(self.tensors[self.source[name]].shape)

    def _tensor(self, name: str) -> torch.Tensor:
        tensor = self.tensors[self.source[name]]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def _pattern(self, module: str) -> str | None:
        """The first exclude pattern that matches ``module``, or None."""
        return next((p for p in self.exclude if matches(module, p)), None)

    def _excluded(self, what: str, members: tuple[str, ...]) -> bool:
        """Whether ``members``, served as one layer, are excluded: all or none, else SchemeError."""
        flags = {m: self._pattern(m) is not None for m in members}
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
        excluded = {m: p for m in linear if (p := self._pattern(m)) is not None}
        for prefix, members in blocks.items():
            self._excluded(f"the experts of {prefix}", tuple(sorted(members)))
        for module in linear:
            group = _siblings(module, linear)
            self._excluded(" / ".join(group), group)
        quantized = linear - excluded.keys()
        bad = sorted(m for m in quantized if self._shape(m + WEIGHT)[1] % NVFP4_BLOCK)
        if bad:
            raise NumericsError(
                f"K (in features) is not a multiple of {NVFP4_BLOCK} for {bad[:8]}; NVFP4 cannot "
                "quantize them: add them to exclude"
            )
        self.excluded = dict(sorted(excluded.items()))
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
        pattern = self._pattern(prefix)
        if pattern is not None:
            self.excluded[prefix] = pattern
            return _Unit(name)
        self._excluded(f"the experts of {prefix}", tuple(m for g in groups for m in g))
        if cols % NVFP4_BLOCK or rows % len(groups[0]):
            raise NumericsError(
                f"{name} is [E, R, K] = {[experts, rows, cols]}: expected K a multiple of "
                f"{NVFP4_BLOCK} and R = {len(groups[0])} x the intermediate size"
            )
        return _Unit(name, groups)

    @property
    def quantized(self) -> list[str]:
        """The modules written NVFP4, in write order."""
        return [m for unit in self.units for group in unit.groups for m in group]

    def _check_input_amax(self) -> None:
        if self.scheme.weight_only:
            return
        needed = self.quantized
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
            files[HF_QUANT_CONFIG] = modelopt.hf_quant_config(self.scheme, sorted(self.excluded))
            section = modelopt.quantization_config(self.scheme, sorted(self.excluded))
        else:
            section = compressed_tensors.quantization_config(self.scheme, sorted(self.excluded))
        if config is not None or self.layout.format == "compressed-tensors":
            files[CONFIG] = {**(config or {}), "quantization_config": section}
        return files


def quantize_state_dict(
    tensors: Mapping[str, torch.Tensor],
    scheme: Scheme | str,
    format: Format = "modelopt",
    exclude: tuple[str, ...] = (),
    input_amax: Mapping[str, float] | None = None,
    config: Mapping[str, Any] | None = None,
    progress: bool = False,
    default_exclude: bool = True,
) -> dict[str, torch.Tensor]:
    """The quantized state dict, in memory, with the tensor names and layout of ``format``.

    ``tensors``: a 16-bit state dict (see the module docstring for what is quantized).
    ``scheme``: W4A16_NVFP4 or W4A4_NVFP4 (or their names). ``exclude``: module-name patterns
    kept 16-bit in addition to :data:`DEFAULT_EXCLUDE`; ``default_exclude=False`` keeps only
    ``exclude`` 16-bit. ``input_amax``: module name -> calibrated max |input|, required for
    every quantized module under W4A4 (input_scale = amax / 2688, the group max for fused
    groups). ``config``: the model's config.json content; its ``model_type`` restores saved
    module names that transformers 5 renames in memory (Mixtral's ``mlp`` is saved as
    ``block_sparse_moe``, its experts as w1/w3/w2 in ModelOpt). ``exclude`` and ``input_amax``
    use the saved names. Raises SchemeError (unsupported scheme, missing input amax, an exclude
    that splits a fused group), NumericsError (K % 16 != 0, NaN or Inf weights),
    CheckpointFormatError (bad format).
    """
    quantization = _Pass(tensors, scheme, format, exclude, default_exclude, input_amax, config)
    return dict(quantization.items(progress))


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (True where that cannot be checked)."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_partials(dst: Path) -> tuple[Path, ...]:
    """Remove the partial directories of earlier writes to ``dst`` that provably died: named
    ``.<dst>.partial-<host>-<pid>-<token>`` with this host's name and a pid that is not a
    running process. Another host's, a running process's, or another naming's are left alone.
    Returns the removed paths (each also logged)."""
    prefix = f".{dst.name}.partial-"
    ours = re.compile(re.escape(prefix) + r"(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]+")
    removed = []
    for path in sorted(dst.parent.glob(glob.escape(prefix) + "*")):
        match = ours.fullmatch(path.name)
        if (
            match
            and match["host"] == _HOST
            and path.is_dir()
            and not path.is_symlink()
            and not _running(int(match["pid"]))
        ):
            shutil.rmtree(path)
            logger.info("removed %s, left by process %s (not running)", path, match["pid"])
            removed.append(path)
    return tuple(removed)


@contextlib.contextmanager
def _sigterm_raises_system_exit() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit(128 + SIGTERM) in the main thread (as
    SIGINT raises KeyboardInterrupt), so the cleanup around the block runs; the previous handler
    is restored after. Installed only in the main thread (Python runs handlers there) and when
    SIGTERM has its default action: a handler the program installed, or SIG_IGN, is its own."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def exit_on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _atomic_directory(dst: Path) -> Iterator[Path]:
    """A fresh temporary directory beside ``dst``, renamed to ``dst`` when the block succeeds
    and removed when it fails, is interrupted (Ctrl-C) or terminated (SIGTERM): no
    half-written checkpoint is ever left at ``dst``. Its files get the mode a plain file write
    gives (0666 minus the umask; safetensors writes 0600)."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(
            f"{dst} exists and is not an empty directory; choose a new path or remove it"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with _sigterm_raises_system_exit():
            yield tmp
        file_mode = tmp.stat().st_mode & 0o666  # mkdir gave 0777 minus the umask
        for file in tmp.iterdir():
            file.chmod(file_mode)
        if dst.exists():
            dst.rmdir()
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_shards(
    directory: Path, items: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int
) -> int:
    """Safetensors shards of at most ``max_shard_bytes`` (a larger tensor gets a shard of its
    own), named as transformers names them, plus the index when there is more than one.
    Returns the bytes of the tensors written."""
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
        return total
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.rename(directory / f"shard-{i}.partial", directory / file)
        weight_map.update(dict.fromkeys(names, file))
    _dump(
        directory / INDEX,
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )
    return total


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write(
    dst_dir: str | Path,
    quantization: _Pass,
    max_shard_bytes: int,
    config: Mapping[str, Any] | None,
    progress: bool,
    side_files: Sequence[Path] = (),
) -> QuantizeSummary:
    """Write the checkpoint of ``quantization`` and copies of ``side_files`` atomically to
    ``dst_dir``, after removing the stale partial directories of earlier writes to it."""
    dst = Path(dst_dir)
    removed = _remove_stale_partials(dst) if dst.parent.is_dir() else ()
    with _atomic_directory(dst) as tmp:
        for file in side_files:
            shutil.copyfile(file, tmp / file.name)
        written = _write_shards(tmp, quantization.items(progress), max_shard_bytes)
        for file, content in quantization.config_files(config).items():
            _dump(tmp / file, content)
    return QuantizeSummary(
        directory=dst,
        format=quantization.layout.format,
        scheme=quantization.scheme,
        quantized=tuple(quantization.quantized),
        kept=dict(quantization.excluded),
        unchanged_tensors=sum(not unit.groups for unit in quantization.units),
        bytes_before=quantization.bytes_read,
        bytes_after=written,
        copied_files=tuple(file.name for file in side_files),
        removed_partials=removed,
    )


def write_checkpoint(
    dst_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    scheme: Scheme | str,
    format: Format = "modelopt",
    exclude: tuple[str, ...] = (),
    input_amax: Mapping[str, float] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
    default_exclude: bool = True,
) -> QuantizeSummary:
    """Quantize ``tensors`` (see :func:`quantize_state_dict`, also for ``exclude``,
    ``default_exclude`` and ``config``) and write a checkpoint to ``dst_dir``, which must not
    exist or be empty.

    Writes ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` plus ``model.safetensors.index.json``) and, for ModelOpt,
    ``hf_quant_config.json``; ``config.json`` (``config`` with ``quantization_config`` added)
    when ``config`` is given, and always for compressed-tensors. Everything is written to a
    temporary directory renamed at the end (see the module docstring). Returns the
    :class:`QuantizeSummary`, which also stands for the path. Raises like quantize_state_dict,
    FileExistsError for a non-empty ``dst_dir``, and OSError when it cannot be written.
    """
    quantization = _Pass(tensors, scheme, format, exclude, default_exclude, input_amax, config)
    return _write(dst_dir, quantization, max_shard_bytes, config, progress)


def _source_files(src: Path) -> tuple[list[Path], tuple[str, ...]]:
    """The side files of model directory ``src`` to copy (:data:`SIDE_FILES`), and the names of
    the other entries, which are not (folders as ``name/``). The config, the index and the
    safetensors files are neither: they are read."""
    copied, skipped = [], []
    for entry in sorted(src.iterdir()):
        if entry.name in (CONFIG, INDEX) or entry.name.endswith(".safetensors"):
            continue
        if entry.is_file() and any(fnmatchcase(entry.name, p) for p in SIDE_FILES):
            copied.append(entry)
        else:
            skipped.append(entry.name + ("/" if entry.is_dir() else ""))
    return copied, tuple(skipped)


def quantize_checkpoint(
    src_dir: str | Path,
    dst_dir: str | Path,
    scheme: Scheme | str,
    format: Format = "modelopt",
    exclude: tuple[str, ...] = (),
    input_amax: Mapping[str, float] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    default_exclude: bool = True,
    allow_outside_paths: bool = False,
) -> QuantizeSummary:
    """Quantize a 16-bit model directory (``config.json`` + safetensors) into ``dst_dir``
    (``quantoracle quantize SRC DST`` on the command line).

    Tensors are read one unit at a time from the index's files or, without an index, from the
    model's own ``model.safetensors`` / ``model-XXXXX-of-YYYYY.safetensors`` (other
    safetensors files are ignored, never merged); ``allow_outside_paths`` as for
    :class:`SafetensorsDirectory`. The side files matching :data:`SIDE_FILES` are copied, the
    others skipped; ``config.json`` gains ``quantization_config``. ``exclude`` and
    ``default_exclude`` as in :func:`quantize_state_dict`. Returns the :class:`QuantizeSummary`
    (with the files copied, skipped and ignored). Raises CheckpointPathError when ``src_dir``
    is missing (or a hub id), a file or has no config.json; CheckpointFormatError when the
    model is already quantized or has no model safetensors; and like :func:`write_checkpoint`.
    """
    src = model_directory(src_dir)
    if not (src / CONFIG).is_file():
        raise CheckpointPathError(
            f"{src}: no {CONFIG}; quantize reads a transformers model directory ({CONFIG} and "
            "the model's safetensors)"
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
    tensors = SafetensorsDirectory(src, allow_outside_paths)
    try:
        quantization = _Pass(
            tensors, scheme, format, exclude, default_exclude, input_amax, config
        )
        copied, skipped = _source_files(src)
        summary = _write(dst_dir, quantization, max_shard_bytes, config, progress, copied)
    finally:
        tensors.close()
    return dataclasses.replace(summary, skipped_files=skipped, ignored_files=tensors.ignored)


__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_MAX_SHARD_BYTES",
    "SIDE_FILES",
    "QuantizeSummary",
    "quantize_state_dict",
    "write_checkpoint",
    "quantize_checkpoint",
]
