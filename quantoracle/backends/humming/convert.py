"""NVFP4Tensor / MoEWeights to Humming's weight schema, once per layer.

The checkpoint tensors are handed to Humming under ModelOpt's names (``weight`` uint8
``[*lead, R, K/2]``, ``weight_scale`` e4m3 ``[*lead, R, K/16]``, ``weight_scale_2`` fp32 per row
shard): Humming's ``modelopt``/``nvfp4`` schema reads exactly quantoracle's layout (same nibble
order, docs/numerics.md). Its conversion keeps one fp32 global scale per expert (or per
Linear) when every row shard has the same one (ModelOpt exports do), and otherwise makes it a
per-row scale in the activation dtype (bf16 rounding of the global scale, up to 2^-9 relative).
Then Humming pads N and K and re-lays the weights and scales for its kernels.

Everything above the ``humming`` import line of :func:`transform` is plain torch, testable on
the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantoracle.backends.humming import CONSTRAINTS
from quantoracle.errors import NumericsError
from quantoracle.schemes.tensors import NVFP4Tensor

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` -> torch dtype; NumericsError for anything else."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise NumericsError(f"humming computes in bfloat16 or float16, not {dtype}")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class GemmShape:
    """One Humming GEMM: N output rows, K inputs, ``experts`` (0 for a Linear), row ``stacks``
    (the row shards, each with its own global scale: gate and up, or fused q/k/v)."""

    n: int
    k: int
    experts: int
    stacks: tuple[int, ...]

    @property
    def padded_n(self) -> int:
        return round_up(self.n, CONSTRAINTS.pad_n)

    @property
    def padded_k(self) -> int:
        return round_up(self.k, CONSTRAINTS.pad_k)

    def check(self, what: str) -> None:
        if self.k % CONSTRAINTS.k_multiple_of or self.n % CONSTRAINTS.n_multiple_of:
            raise NumericsError(
                f"humming {what}: N={self.n} must be a multiple of {CONSTRAINTS.n_multiple_of} and "
                f"K={self.k} of {CONSTRAINTS.k_multiple_of}"
            )

    def nbytes(self, per_row_scale_2: bool) -> int:
        """Bytes of the converted tensors: codes (4 bits) and e4m3 block scales over the padded
        shape, and the global scale: fp32 per expert, or 16-bit per padded row."""
        lead = max(self.experts, 1)
        n, k = self.padded_n, self.padded_k
        scale_2 = 2 * n if per_row_scale_2 else 4
        return lead * (n * k // 2 + n * k // 16 + scale_2)


def gemm_shape(t: NVFP4Tensor) -> GemmShape:
    lead = t.packed.shape[:-2]
    if len(lead) > 1:
        raise NumericsError(f"humming: weights are [R, K/2] or [E, R, K/2], found {tuple(t.packed.shape)}")
    return GemmShape(t.rows, t.cols, lead[0] if lead else 0, (t.rows // t.shards,) * t.shards)


def checkpoint_tensors(t: NVFP4Tensor) -> dict[str, torch.Tensor]:
    """The tensors under the names Humming's ModelOpt schema reads; no copy."""
    return {"weight": t.packed, "weight_scale": t.block_scale, "weight_scale_2": t.global_scale}


def uniform_global_scale(t: NVFP4Tensor) -> bool:
    """Whether every row shard (of every expert) shares its global scale, so Humming keeps it as
    one fp32 scale per expert. Synchronizes with the device (prepare time only)."""
    g = t.global_scale
    return bool((g == g[..., :1]).all())


@dataclass
class Converted:
    """A GEMM in Humming's layout: its ``LayerConfig`` and tensors (``weight`` int32,
    ``weight_scale``, ``weight_scale_2``)."""

    config: object
    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_scale_2: torch.Tensor | None
    shape: GemmShape

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.weight, self.weight_scale, self.weight_scale_2) if t is not None)


def transform(t: NVFP4Tensor, dtype: torch.dtype, what: str) -> Converted:
    """Convert one NVFP4 weight (a Linear, or one projection of every expert) with Humming's
    ModelOpt schema and transform (padding to CONSTRAINTS.pad_n / pad_k, weight re-layout)."""
    shape = gemm_shape(t)
    shape.check(what)
    if not t.packed.is_cuda:
        raise NumericsError(f"humming {what}: weights must be on a CUDA device, found {t.packed.device}")
    from humming.schema import BaseWeightSchema
    from humming.transform import prepare_and_transform_humming_tensors

    experts = shape.experts or None
    schema = BaseWeightSchema.from_config({"quant_method": "modelopt", "quant_algo": "nvfp4"})
    schema, tensors = schema.convert_humming(
        tensors=checkpoint_tensors(t), shape_n_stacks=list(shape.stacks), shape_k_stacks=[shape.k],
        param_dtype=dtype, num_experts=experts, device=t.packed.device,
    )
    config, tensors = prepare_and_transform_humming_tensors(
        tensors=tensors, shape_n=shape.n, shape_k=shape.k, weight_schema=schema, num_experts=experts,
        pad_n_to_multiple=CONSTRAINTS.pad_n, pad_k_to_multiple=CONSTRAINTS.pad_k, has_bias=False,
        torch_dtype=dtype, device=t.packed.device,
    )
    return Converted(config, tensors["weight"], tensors["weight_scale"], tensors.get("weight_scale_2"), shape)
