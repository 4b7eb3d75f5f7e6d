"""Read the quantized layers of a checkpoint directory: sharded safetensors (with
``model.safetensors.index.json``) or single files, ModelOpt or compressed-tensors.

:meth:`Checkpoint.layers` lists every quantized layer from the file headers alone;
:meth:`Checkpoint.linear` and :meth:`Checkpoint.moe` read one layer's NVFP4 tensors, or only a
tensor- or expert-parallel slice of them (``safe_open(...).get_slice(name)[...]``: the rest of
the tensor is never read from disk).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from quantoracle.errors import CheckpointFormatError, ProblemError
from quantoracle.schemes.checkpoint.config import ActivationOverride, QuantConfig
from quantoracle.schemes.checkpoint.detect import load_quant_config
from quantoracle.schemes.checkpoint.layout import EXPERT_MODULE, EXPERT_PROJECTIONS, LAYOUTS, Role
from quantoracle.schemes.checkpoint.storage import SafetensorsDirectory
from quantoracle.schemes.keys import NVFP4_BLOCK, NVFP4_WEIGHT
from quantoracle.schemes.scheme import Scheme
from quantoracle.schemes.tensors import MoEWeights, NVFP4Tensor

ROLES: tuple[Role, ...] = ("gate", "up", "down")
_MIN_SCALE = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class LayerEntry:
    """One quantized layer of a checkpoint.

    ``kind`` "linear": ``name`` is the module, with ``n`` (output) and ``k`` (input) features.
    ``kind`` "moe": ``name`` is the block prefix (``...mlp.experts``) grouping ``experts``
    experts of ``hidden`` inputs and ``intermediate`` features (gate and up: [I, H], down: [H, I]).
    ``scheme`` is the served scheme (after any activation override).
    """

    name: str
    kind: Literal["linear", "moe"]
    scheme: Scheme
    n: int | None = None
    k: int | None = None
    experts: int | None = None
    hidden: int | None = None
    intermediate: int | None = None

    def __repr__(self) -> str:
        if self.kind == "linear":
            shape = f"n={self.n}, k={self.k}"
        else:
            shape = (
                f"experts={self.experts}, hidden={self.hidden}, "
                f"intermediate={self.intermediate}"
            )
        return f"LayerEntry({self.kind} {self.name!r}, {self.scheme}, {shape})"


@dataclass(frozen=True)
class _Module:
    name: str
    scheme: Scheme
    rows: int
    cols: int  # K, unpacked


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _span(extent: int, rank: int, size: int, what: str, multiple: int = 1) -> slice:
    """Rank ``rank`` of ``size`` equal parts of ``extent``, each a multiple of ``multiple``."""
    if size < 1 or not 0 <= rank < size:
        raise ProblemError(
            f"{what}: rank {rank} of size {size}; need size >= 1 and 0 <= rank < size"
        )
    part = extent // size
    if extent % size or part % multiple:
        raise ProblemError(
            f"{what}: {extent} does not split into {size} equal parts that are multiples of "
            f"{multiple}; choose a parallel size that divides it into such parts"
        )
    return slice(rank * part, (rank + 1) * part)


class Checkpoint:
    """A quantized checkpoint directory. Open with :meth:`open`; use as a context manager (or
    call :meth:`close`) to release the file handles.

    - ``config``: the directory's :class:`QuantConfig`.
    - ``layers()``: every quantized layer, Linear and MoE, in natural name order.
    - ``linear(name, shard)`` -> :class:`NVFP4Tensor`; ``moe(prefix, experts, tp)`` ->
      :class:`MoEWeights`. Global scales come back in ModelOpt's convention (compressed-tensors'
      reciprocals are read through 1/x); gate and up keep their own scales, nothing is
      requantized.

    Malformed files raise CheckpointFormatError naming the file, tensor, expected and found
    shape or dtype; impossible shards raise ProblemError.
    """

    def __init__(self, config: QuantConfig, files: SafetensorsDirectory):
        self.config = config
        self.files = files
        self.directory = files.directory
        self._layout = LAYOUTS[config.format]
        self._entries: dict[str, LayerEntry] | None = None
        self._experts: dict[str, list[dict[Role, str]]] = {}

    @classmethod
    def open(
        cls,
        directory: str | Path,
        override_activation: ActivationOverride | None = None,
        allow_outside_paths: bool = False,
    ) -> Checkpoint:
        """Open a checkpoint directory: its config (see :func:`load_quant_config`, which also
        says what a path that is not a quantized checkpoint raises) and its tensors (see
        :class:`SafetensorsDirectory`). ``allow_outside_paths=True`` lets the index name files
        outside the directory (refused by default)."""
        return cls(
            load_quant_config(directory, override_activation),
            SafetensorsDirectory(directory, allow_outside_paths),
        )

    def __repr__(self) -> str:
        default = self.config.default or "per layer"
        return f"Checkpoint({str(self.directory)!r}, {self.config.format}, {default})"

    def close(self) -> None:
        self.files.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _header(self, name: str, dtype: str, ndims: tuple[int, ...]) -> list[int]:
        """The shape of tensor ``name``, checked: safetensors ``dtype``, a rank in ``ndims``."""
        if name not in self.files:
            raise CheckpointFormatError(
                f"{self.directory}: tensor {name} is missing; expected {dtype} with {ndims[0]} dims"
            )
        found_dtype, shape = self.files.header(name)
        if found_dtype != dtype or len(shape) not in ndims:
            raise CheckpointFormatError(
                f"{self.files.where(name)}: expected {dtype} with "
                f"{' or '.join(map(str, ndims))} dims, "
                f"found {found_dtype} {shape}"
            )
        return shape

    # ---- the layer list ----

    def layers(self) -> list[LayerEntry]:
        """Every quantized layer, from the headers: a module is quantized when it has a
        ``weight_scale`` tensor; experts ``<prefix>.experts.<e>.<projection>`` group into one
        "moe" entry per prefix. Raises CheckpointFormatError when the config and the tensors
        disagree, or tensors are missing, unknown or mis-shaped."""
        if self._entries is None:
            self._entries = self._scan()
        return list(self._entries.values())

    def _scan(self) -> dict[str, LayerEntry]:
        suffixes: dict[str, set[str]] = defaultdict(set)
        for name in self.files:
            module, _, suffix = name.rpartition(".")
            suffixes[module].add(suffix)
        entries: dict[str, LayerEntry] = {}
        blocks: dict[str, dict[int, dict[Role, _Module]]] = defaultdict(lambda: defaultdict(dict))
        for module in sorted((m for m, s in suffixes.items() if "weight_scale" in s), key=_natural):
            scheme = self.config.scheme_for(module)
            if scheme is None:
                raise CheckpointFormatError(
                    f"{self.files.where(module + '.weight_scale')}: {module} holds quantized "
                    "tensors but "
                    f"{self.config.source} says it is not quantized; fix the config's excludes"
                )
            found = self._check_module(module, scheme, suffixes[module])
            expert = EXPERT_MODULE.match(module)
            if expert is None:
                entries[module] = LayerEntry(module, "linear", scheme, n=found.rows, k=found.cols)
                continue
            role = EXPERT_PROJECTIONS[expert["projection"]]
            slot = blocks[expert["prefix"]][int(expert["expert"])]
            if role in slot:
                raise CheckpointFormatError(
                    f"{self.directory}: expert {module} and {slot[role].name} are both the {role} "
                    "projection; keep one naming (gate_proj/up_proj/down_proj or w1/w3/w2)"
                )
            slot[role] = found
        for prefix, experts in blocks.items():
            entries[prefix] = self._block_entry(prefix, experts)
        return dict(sorted(entries.items(), key=lambda item: _natural(item[0])))

    def _check_module(self, module: str, scheme: Scheme, suffixes: set[str]) -> _Module:
        if scheme.weight != NVFP4_WEIGHT:
            rows, cols = self._header(f"{module}.weight", "F8_E4M3", (2,))
            return _Module(module, scheme, rows, cols)
        layout = self._layout
        unknown = suffixes - layout.suffixes
        if unknown:
            raise CheckpointFormatError(
                f"{self.directory}: {module} has tensors {sorted(unknown)} that a {layout.format} "
                f"NVFP4 layer does not have (it has {layout.packed}, {layout.block_scale}, "
                f"{layout.weight_global}, {layout.input_global}); AWQ-style pre_quant_scale and "
                "other extras are not supported"
            )
        rows, half = self._header(f"{module}.{layout.packed}", "U8", (2,))
        scale_shape = self._header(f"{module}.{layout.block_scale}", "F8_E4M3", (2,))
        if half % (NVFP4_BLOCK // 2) or scale_shape != [rows, half * 2 // NVFP4_BLOCK]:
            raise CheckpointFormatError(
                f"{self.files.where(module + '.' + layout.block_scale)}: expected shape "
                f"[{rows}, {half * 2 // NVFP4_BLOCK}] for {layout.packed} [{rows}, {half}] "
                f"(K = {half * 2} must be a multiple of {NVFP4_BLOCK}), found {scale_shape}"
            )
        globals_ = [layout.weight_global]
        if not scheme.weight_only or layout.input_global in suffixes:
            globals_.append(layout.input_global)
        for suffix in globals_:
            shape = self._header(f"{module}.{suffix}", "F32", (0, 1))
            if shape not in ([], [1]):
                raise CheckpointFormatError(
                    f"{self.files.where(module + '.' + suffix)}: expected one value, shape [] "
                    f"or [1], found {shape}"
                )
        return _Module(module, scheme, rows, half * 2)

    def _block_entry(self, prefix: str, experts: dict[int, dict[Role, _Module]]) -> LayerEntry:
        count = len(experts)
        if sorted(experts) != list(range(count)):
            raise CheckpointFormatError(
                f"{self.directory}: {prefix} has experts {sorted(experts)}; expected 0..{count - 1}"
            )
        first = experts[0]
        for e, slot in experts.items():
            if set(slot) != set(ROLES):
                raise CheckpointFormatError(
                    f"{self.directory}: {prefix}.{e} has projections {sorted(slot)}; expected "
                    "gate, up and down (gate_proj/up_proj/down_proj or w1/w3/w2)"
                )
        schemes = {m.scheme for slot in experts.values() for m in slot.values()}
        if len(schemes) > 1:
            raise CheckpointFormatError(
                f"{self.config.source}: the experts of {prefix} have schemes "
                f"{sorted(map(str, schemes))}; one MoE layer needs one scheme"
            )
        intermediate, hidden = first["gate"].rows, first["gate"].cols
        expected = {
            "gate": (intermediate, hidden),
            "up": (intermediate, hidden),
            "down": (hidden, intermediate),
        }
        for slot in experts.values():
            for role, module in slot.items():
                if (module.rows, module.cols) != expected[role]:
                    raise CheckpointFormatError(
                        f"{self.directory}: {module.name} is [{module.rows}, {module.cols}] "
                        f"(unpacked); expert 0 implies [{expected[role][0]}, {expected[role][1]}]"
                    )
        self._experts[prefix] = [
            {role: slot[role].name for role in ROLES} for _, slot in sorted(experts.items())
        ]
        return LayerEntry(
            prefix, "moe", schemes.pop(), experts=count, hidden=hidden, intermediate=intermediate
        )

    def _entry(self, name: str, kind: str) -> LayerEntry:
        entries = self._entries if self._entries is not None else {e.name: e for e in self.layers()}
        entry = entries.get(name)
        if entry is None or entry.kind != kind:
            known = [e.name for e in entries.values() if e.kind == kind][:5]
            raise CheckpointFormatError(
                f"{self.directory}: no quantized {kind} layer named {name!r}; layers() lists them "
                f"(e.g. {known})"
            )
        if entry.scheme.weight != NVFP4_WEIGHT:
            raise CheckpointFormatError(
                f"{self.directory}: {name} is {entry.scheme}; quantoracle reads NVFP4 tensors only"
            )
        return entry

    # ---- tensors ----

    def _scale(self, name: str) -> torch.Tensor:
        scale = self._layout.scale(self.files.read(name))
        if not bool(torch.isfinite(scale)) or not bool(scale >= _MIN_SCALE):
            raise CheckpointFormatError(
                f"{self.files.where(name)}: the global scale is {scale.item()} (ModelOpt "
                "convention); "
                "it must be a positive normal float. Re-export the layer"
            )
        return scale

    def _nvfp4(self, module: str, rows: slice, cols: slice, with_input: bool) -> NVFP4Tensor:
        """Rows x cols (unpacked elements) of one module, global scales of shape [1]."""
        layout = self._layout
        packed = self.files.read(
            f"{module}.{layout.packed}", (rows, slice(cols.start // 2, cols.stop // 2))
        )
        scale_name = f"{module}.{layout.block_scale}"
        blocks = slice(cols.start // NVFP4_BLOCK, cols.stop // NVFP4_BLOCK)
        block_scale = self.files.read(scale_name, (rows, blocks))
        if bool(((block_scale.view(torch.uint8) & 0x7F) == 0x7F).any()):
            raise CheckpointFormatError(
                f"{self.files.where(scale_name)}: holds NaN block scales (0x7F/0xFF), as ModelOpt "
                "writes "
                "for all-zero weights; re-export with quantoracle (which writes 0x38)"
            )
        global_scale = self._scale(f"{module}.{layout.weight_global}").reshape(1)
        input_scale = (
            self._scale(f"{module}.{layout.input_global}").reshape(1) if with_input else None
        )
        return NVFP4Tensor(packed.contiguous(), block_scale.contiguous(), global_scale, input_scale)

    def linear(
        self, name: str, shard: tuple[Literal["rows", "cols"], int, int] | None = None
    ) -> NVFP4Tensor:
        """The NVFP4 weight of Linear ``name``: packed [N, K/2], block_scale [N, K/16],
        global_scale [1], input_scale [1] (W4A4 served) or None.

        ``shard=("rows", rank, size)`` reads rows ``[rank*N/size, (rank+1)*N/size)`` (column-
        parallel layers); ``("cols", rank, size)`` reads that slice of K (row-parallel layers),
        which must be a multiple of 16. ProblemError when N or K does not split so.
        """
        entry = self._entry(name, "linear")
        rows, cols = slice(0, entry.n), slice(0, entry.k)
        if shard is not None:
            dim, rank, size = shard
            if dim == "rows":
                rows = _span(entry.n, rank, size, f"{name} rows (N)")
            elif dim == "cols":
                cols = _span(entry.k, rank, size, f"{name} columns (K)", NVFP4_BLOCK)
            else:
                raise ProblemError(f'shard dim {dim!r}; use "rows" or "cols"')
        return self._nvfp4(name, rows, cols, not entry.scheme.weight_only)

    def moe(
        self, prefix: str, experts: range | None = None, tp: tuple[int, int] | None = None
    ) -> MoEWeights:
        """The experts of MoE block ``prefix`` as :class:`MoEWeights`.

        ``experts=range(a, b)`` reads experts a..b-1 only (expert parallelism; ``first_expert``
        = a). ``tp=(rank, size)`` splits the intermediate dim I: rows of gate and up, columns of
        down; I/size must be a multiple of 16. ProblemError for other ranges or splits.
        """
        entry = self._entry(prefix, "moe")
        chosen = range(entry.experts) if experts is None else experts
        if (
            not isinstance(chosen, range)
            or chosen.step != 1
            or not 0 <= chosen.start < chosen.stop <= entry.experts
        ):
            raise ProblemError(
                f"{prefix}: experts={experts!r}; pass a non-empty range(a, b) with step 1 inside "
                f"range(0, {entry.experts})"
            )
        inner = slice(0, entry.intermediate)
        if tp is not None:
            inner = _span(
                entry.intermediate, tp[0], tp[1], f"{prefix} intermediate (I)", NVFP4_BLOCK
            )
        hidden = slice(0, entry.hidden)
        with_input = not entry.scheme.weight_only
        gate_up, down = [], []
        for e in chosen:
            names = self._experts[prefix][e]
            gate_up.append(
                _combine(
                    torch.cat,
                    [
                        self._nvfp4(names["gate"], inner, hidden, with_input),
                        self._nvfp4(names["up"], inner, hidden, with_input),
                    ],
                )
            )
            down.append(self._nvfp4(names["down"], hidden, inner, with_input))
        return MoEWeights(_combine(torch.stack, gate_up), _combine(torch.stack, down), chosen.start)


def _combine(join, parts: list[NVFP4Tensor]) -> NVFP4Tensor:
    """``join`` (torch.cat: rows of row shards; torch.stack: experts) applied field by field;
    global scales [S] concatenate into [S*len] or stack into [len, S] alike."""

    def field(values: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if values[0] is None else join(values)

    return NVFP4Tensor(
        field([p.packed for p in parts]),
        field([p.block_scale for p in parts]),
        field([p.global_scale for p in parts]),
        field([p.input_scale for p in parts]),
    )


__all__ = ["Checkpoint", "LayerEntry"]
