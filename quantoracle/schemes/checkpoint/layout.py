"""How quantized checkpoints name their tensors: per-format tensor names and global-scale
conventions, and the module names of MoE experts and of fused projection groups."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

Format = Literal["modelopt", "compressed-tensors"]
FORMATS: tuple[Format, ...] = ("modelopt", "compressed-tensors")


@dataclass(frozen=True)
class TensorLayout:
    """The tensor names of one NVFP4 Linear ``<m>`` in a format, and how it stores global scales.

    ModelOpt stores ``weight_scale_2`` and ``input_scale`` as float32 ``[]``; compressed-tensors
    stores their reciprocals ``weight_global_scale`` and ``input_global_scale`` as float32 ``[1]``.
    :meth:`scale` turns a stored global into ModelOpt's convention, :meth:`stored` the reverse.
    ``1 / (1 / x)`` differs from x in about 13% of float32 values, so a writer quantizes with
    ``scale(stored(x))``: then what it writes is exactly what every reader serves.
    """

    format: Format
    packed: str
    block_scale: str
    weight_global: str
    input_global: str
    global_shape: tuple[int, ...]
    reciprocal: bool

    @property
    def suffixes(self) -> frozenset[str]:
        """Every tensor suffix the layout reads, plus those it knowingly leaves alone (a bias
        stays 16-bit; k_scale / v_scale belong to the KV cache)."""
        return frozenset(
            {self.packed, self.block_scale, self.weight_global, self.input_global}
            | {"bias", "k_scale", "v_scale"}
        )

    def scale(self, stored: torch.Tensor) -> torch.Tensor:
        """ModelOpt's float32 0-dim scale of a stored global (``1 / x`` if ``reciprocal``)."""
        value = stored.reshape(()).to(torch.float32)
        return 1.0 / value if self.reciprocal else value

    def stored(self, scale: torch.Tensor) -> torch.Tensor:
        """The tensor to store for a ModelOpt-convention scale."""
        value = 1.0 / scale if self.reciprocal else scale
        return value.to(torch.float32).reshape(self.global_shape)


MODELOPT = TensorLayout(
    format="modelopt",
    packed="weight",
    block_scale="weight_scale",
    weight_global="weight_scale_2",
    input_global="input_scale",
    global_shape=(),
    reciprocal=False,
)
COMPRESSED_TENSORS = TensorLayout(
    format="compressed-tensors",
    packed="weight_packed",
    block_scale="weight_scale",
    weight_global="weight_global_scale",
    input_global="input_global_scale",
    global_shape=(1,),
    reciprocal=True,
)
LAYOUTS: dict[str, TensorLayout] = {
    MODELOPT.format: MODELOPT,
    COMPRESSED_TENSORS.format: COMPRESSED_TENSORS,
}

Role = Literal["gate", "up", "down"]
EXPERT_PROJECTIONS: dict[str, Role] = {
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",  # Qwen, DeepSeek, llm-compressor
    "w1": "gate",
    "w3": "up",
    "w2": "down",  # Mixtral as ModelOpt writes it
}
EXPERT_MODULE = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<projection>"
    + "|".join(EXPERT_PROJECTIONS)
    + r")$"
)
"""``<prefix>.experts.<e>.<projection>``: one expert's projection; the MoE block is ``prefix``."""

FUSED_EXPERTS = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<param>gate_up_proj|down_proj)$")
"""transformers 5 fused expert parameters: ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]."""

FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
"""Serving engines fuse these module groups into one layer; they must share a quantization."""

SAVED_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": ((".mlp.", ".block_sparse_moe."),),
}
"""model_type -> (in-memory, saved) name substrings. transformers 5 renames these modules in
memory; checkpoints keep the saved names, as ``save_pretrained`` and ModelOpt write them."""

SHARED_SCALE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
)
"""Sibling modules that share one ``weight_scale_2`` and ``input_scale`` (docs/numerics.md)."""
