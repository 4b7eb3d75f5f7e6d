"""Typed containers for the NVFP4 tensors of one layer, as every backend receives them.

Layouts are the checkpoint's (ModelOpt), unchanged; a backend's ``prepare`` may re-lay them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantoracle.errors import NumericsError
from quantoracle.schemes import nvfp4


@dataclass(frozen=True, eq=False)
class NVFP4Tensor:
    """One NVFP4-quantized weight, optionally stacked over experts and split into row shards.

    - ``packed``: uint8 ``[*lead, R, K/2]``, two E2M1 codes per byte, element 2i in the low nibble.
    - ``block_scale``: float8_e4m3fn ``[*lead, R, K/16]``, one scale per 16 elements along K.
    - ``global_scale``: float32 ``[*lead, S]``, ModelOpt's ``weight_scale_2`` of each row shard:
      shard s covers rows ``[s*R/S, (s+1)*R/S)`` (S = 2 for a fused gate/up: gate rows first).
    - ``input_scale``: float32 ``[*lead, S]`` (W4A4 checkpoints: the static activation global
      scale of each shard's module) or ``None`` (weight-only).

    ``lead`` is ``()`` for a Linear and ``(E,)`` for the experts of a MoE layer.
    """

    packed: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor
    input_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        p, s, g = self.packed, self.block_scale, self.global_scale
        if p.dtype != torch.uint8:
            raise NumericsError(f"packed must be uint8, found {p.dtype}")
        if s.dtype != torch.float8_e4m3fn:
            raise NumericsError(f"block_scale must be float8_e4m3fn, found {s.dtype}")
        if g.dtype != torch.float32:
            raise NumericsError(f"global_scale must be float32, found {g.dtype}")
        if p.dim() < 2 or s.shape[:-1] != p.shape[:-1] or s.shape[-1] * 8 != p.shape[-1]:
            raise NumericsError(
                f"packed {tuple(p.shape)} and block_scale {tuple(s.shape)} disagree: expected "
                f"packed [*lead, R, K/2] and block_scale [*lead, R, K/16]"
            )
        if g.dim() != p.dim() - 1 or g.shape[:-1] != p.shape[:-2] or p.shape[-2] % g.shape[-1]:
            raise NumericsError(
                f"global_scale {tuple(g.shape)} must be [*lead, S] with S dividing R for packed "
                f"{tuple(p.shape)}"
            )
        if self.input_scale is not None and (
            self.input_scale.shape != g.shape or self.input_scale.dtype != torch.float32
        ):
            raise NumericsError(
                f"input_scale must be float32 {tuple(g.shape)} like global_scale, found "
                f"{self.input_scale.dtype} {tuple(self.input_scale.shape)}"
            )

    @classmethod
    def quantize(
        cls, w: torch.Tensor, *, shards: int = 1, input_amax: torch.Tensor | None = None
    ) -> "NVFP4Tensor":
        """Quantize float weights ``[*lead, R, K]`` as ModelOpt exports them.

        Each lead index (each expert) is one fused group: its ``shards`` row shards share one
        ``scale_2`` from the group's max amax (docs/numerics.md), stored once per shard.
        ``input_amax`` (float32 ``[*lead, shards]``, calibrated max |x| of each shard's input)
        gives W4A4's ``input_scale = amax / 2688``; ``None`` makes a weight-only tensor.
        """
        lead, (rows, cols) = w.shape[:-2], w.shape[-2:]
        parts = [nvfp4.quantize_weight(m) for m in w.reshape(-1, rows, cols)]
        packed, block_scale, scale_2 = (torch.stack(t) for t in zip(*parts))
        global_scale = scale_2.reshape(*lead, 1).expand(*lead, shards).contiguous()
        input_scale = None
        if input_amax is not None:
            flat = input_amax.reshape(-1)
            input_scale = torch.stack([nvfp4.global_scale(a) for a in flat]).reshape(global_scale.shape)
        return cls(
            packed.reshape(*lead, rows, cols // 2),
            block_scale.reshape(*lead, rows, cols // nvfp4.BLOCK),
            global_scale,
            None if input_scale is None else input_scale.to(w.device),
        )

    @property
    def rows(self) -> int:
        """R, the output dimension (N of a Linear, 2I or H of an expert projection)."""
        return self.packed.shape[-2]

    @property
    def cols(self) -> int:
        """K, the input dimension (unpacked)."""
        return self.packed.shape[-1] * 2

    @property
    def shards(self) -> int:
        return self.global_scale.shape[-1]

    def row_global_scale(self) -> torch.Tensor:
        """float32 ``[*lead, R, 1]``: each row's global scale."""
        per_row = self.global_scale.repeat_interleave(self.rows // self.shards, dim=-1)
        return per_row.unsqueeze(-1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[*lead, R, K]`` in ``dtype``; exact in float32 (ModelOpt's order)."""
        return nvfp4.dequantize(self.packed, self.block_scale, self.row_global_scale(), dtype)

    def select(self, index: int | slice) -> "NVFP4Tensor":
        """Index the first lead dimension (an expert, or a range of experts)."""
        return NVFP4Tensor(
            self.packed[index],
            self.block_scale[index],
            self.global_scale[index],
            None if self.input_scale is None else self.input_scale[index],
        )

    def to(self, device: torch.device | str) -> "NVFP4Tensor":
        return NVFP4Tensor(
            self.packed.to(device),
            self.block_scale.to(device),
            self.global_scale.to(device),
            None if self.input_scale is None else self.input_scale.to(device),
        )

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.packed, self.block_scale, self.global_scale, self.input_scale)
            if t is not None
        )

    def __repr__(self) -> str:
        """Scheme, logical shape ``[*lead, R, K]``, device and each field's dtype and shape;
        never the values."""
        shape = [*self.packed.shape[:-1], self.cols]
        fields = ", ".join(
            f"{name} {_describe(getattr(self, name))}"
            for name in ("packed", "block_scale", "global_scale", "input_scale")
        )
        return f"NVFP4Tensor({_scheme_name(self)} {shape} on {self.packed.device}: {fields})"


@dataclass(frozen=True, eq=False)
class MoEWeights:
    """The experts of one fused-MoE layer.

    - ``gate_up``: ``[E, 2I, H/2]`` packed, gate rows ``[0, I)`` then up rows ``[I, 2I)``;
      ``global_scale`` ``[E, 2]`` (gate, up: they may differ; nothing is requantized).
    - ``down``: ``[E, H, I/2]`` packed, ``global_scale`` ``[E, 1]``.
    - ``first_expert``: the global index of local expert 0 (expert parallelism; 0 otherwise).
    """

    gate_up: NVFP4Tensor
    down: NVFP4Tensor
    first_expert: int = 0

    def __post_init__(self) -> None:
        gu, d = self.gate_up, self.down
        if gu.packed.dim() != 3 or d.packed.dim() != 3:
            raise NumericsError("MoE weights must be stacked over experts: [E, rows, K/2]")
        if gu.shards != 2 or d.shards != 1:
            raise NumericsError(
                f"gate_up needs 2 global-scale shards (gate, up) and down 1, found "
                f"{gu.shards} and {d.shards}"
            )
        e, two_i, h = gu.packed.shape[0], gu.rows, gu.cols
        if d.packed.shape[0] != e or d.rows != h or d.cols * 2 != two_i:
            raise NumericsError(
                f"gate_up [E={e}, 2I={two_i}, H={h}] and down [E={d.packed.shape[0]}, "
                f"H={d.rows}, I={d.cols}] disagree"
            )

    @property
    def experts(self) -> int:
        return self.gate_up.packed.shape[0]

    @property
    def hidden(self) -> int:
        return self.gate_up.cols

    @property
    def intermediate(self) -> int:
        return self.down.cols

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def to(self, device: torch.device | str) -> "MoEWeights":
        return MoEWeights(self.gate_up.to(device), self.down.to(device), self.first_expert)

    def __repr__(self) -> str:
        """Scheme, sizes, expert range and device; the parts' dtypes and shapes, never values."""
        first = self.first_expert
        return (
            f"MoEWeights({_scheme_name(self.gate_up)}, experts={self.experts} "
            f"({first}..{first + self.experts - 1}), hidden={self.hidden}, "
            f"intermediate={self.intermediate} on {self.gate_up.packed.device}; gate_up packed "
            f"{_describe(self.gate_up.packed)}, down packed {_describe(self.down.packed)})"
        )


def _scheme_name(weight: NVFP4Tensor) -> str:
    """w4a4_nvfp4 with an input scale, else w4a16_nvfp4 (for reprs)."""
    return "w4a16_nvfp4" if weight.input_scale is None else "w4a4_nvfp4"


def _describe(tensor: torch.Tensor | None) -> str:
    """``dtype [shape]`` of a tensor (``None`` for None), for reprs."""
    if tensor is None:
        return "None"
    return f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"
