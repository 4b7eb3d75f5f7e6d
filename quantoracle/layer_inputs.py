"""Checks of what a layer is given, at its boundary, before any kernel sees it.

Each function raises :class:`~quantoracle.errors.InputError` naming the layer, the tensor, what
was found and what was expected, and returns nothing otherwise. They are called at the top of the
methods of :mod:`quantoracle.layers`; a wrong input never reaches a backend.

Cost. Shape and dtype checks read tensor metadata only: they always run and never synchronize
with a GPU. Value checks (expert ids inside ``[0, E)``) read the tensor's values: on CPU tensors
that is free and they always run; on any other device it would be a host synchronization per
call, so they run there only when the environment variable ``QUANTORACLE_CHECK_INPUTS=1`` is set
(read at each call: set it while debugging, leave it unset in production).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from quantoracle.errors import InputError

if TYPE_CHECKING:
    from quantoracle.layers import NVFP4FusedMoE, NVFP4Linear
    from quantoracle.schemes.checkpoint import Checkpoint
    from quantoracle.schemes.tensors import NVFP4Tensor

CHECK_INPUTS = "QUANTORACLE_CHECK_INPUTS"
"""Environment variable: ``1`` turns on value checks of tensors on a GPU (a host sync each)."""


def value_checks_enabled(tensor: torch.Tensor) -> bool:
    """Whether a check that reads ``tensor``'s values runs: always on CPU, elsewhere only with
    ``QUANTORACLE_CHECK_INPUTS=1``."""
    return tensor.device.type == "cpu" or os.environ.get(CHECK_INPUTS) == "1"


def _layer(name: str | None, kind: str) -> str:
    return f"{kind} {name!r}" if name else kind


def _shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)


def _tensor(value: Any, what: str, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{where}: {what} must be a torch.Tensor, found {type(value).__name__}")
    return value


def _floating(tensor: torch.Tensor, what: str, where: str) -> None:
    if not tensor.is_floating_point():
        raise InputError(
            f"{where}: {what} has dtype {tensor.dtype}; it must be a floating-point tensor "
            f"(e.g. {what}.to(torch.bfloat16)): integer and bool values are not cast silently"
        )


def check_linear_input(layer: NVFP4Linear, x: Any) -> None:
    """``x`` for :meth:`NVFP4Linear.forward`: a floating-point tensor ``[..., K]`` with at least
    one leading (token) dimension; ``K`` is ``layer.in_features``, or this rank's slice of it for
    a row-parallel layer built with ``input_is_parallel=True``. Metadata only."""
    where = _layer(layer.layer_name, "NVFP4Linear")
    x = _tensor(x, "x", where)
    shards = layer.resolution.problem.parallel.tp_size if layer.input_is_parallel else 1
    width = layer.in_features // shards
    if x.dim() < 2:
        raise InputError(
            f"{where}: x has shape {_shape(x)}; expected [..., {width}] with at least one token "
            "dimension: pass x.unsqueeze(0) for a single token"
        )
    if x.shape[-1] != width:
        note = f" (this rank's slice of {layer.in_features}: input_is_parallel=True)" if shards > 1 else ""
        raise InputError(
            f"{where}: x has shape {_shape(x)}; expected [..., {width}]{note}: its last dimension "
            "must be the layer's input features"
        )
    _floating(x, "x", where)


def _check_moe_x(layer: NVFP4FusedMoE, x: Any) -> str:
    where = _layer(layer.layer_name, "NVFP4FusedMoE")
    hidden = layer.resolution.problem.k
    x = _tensor(x, "x", where)
    if x.dim() != 2 or x.shape[1] != hidden:
        raise InputError(
            f"{where}: x has shape {_shape(x)}; expected [M, {hidden}] (tokens, hidden): "
            f"flatten the tokens first, x.reshape(-1, {hidden})"
        )
    _floating(x, "x", where)
    return where


def check_routed_input(layer: NVFP4FusedMoE, x: Any, topk_weights: Any, topk_ids: Any) -> None:
    """The arguments of :meth:`NVFP4FusedMoE.forward_routed`: ``x`` floating-point ``[M, H]``;
    ``topk_weights`` floating-point and ``topk_ids`` of an integer dtype, both ``[M, top_k]``;
    the ids global expert ids in ``[0, E)`` (with expert parallelism too: ids are global, and
    each rank runs those of its experts). The range check reads the ids' values: see the module
    docstring for when it runs. Shapes and dtypes are always checked."""
    where = _check_moe_x(layer, x)
    expected = [x.shape[0], layer.top_k]
    for what, value in (("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        tensor = _tensor(value, what, where)
        if _shape(tensor) != expected:
            raise InputError(
                f"{where}: {what} has shape {_shape(tensor)}; expected {expected} "
                f"(one row per token of x {_shape(x)}, top_k={layer.top_k} columns)"
            )
    _floating(topk_weights, "topk_weights", where)
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise InputError(
            f"{where}: topk_ids has dtype {topk_ids.dtype}; expert ids must be an integer tensor "
            "(torch.int64 or torch.int32, as torch.topk returns them): float ids would be truncated"
        )
    experts = layer.num_experts
    if topk_ids.numel() and value_checks_enabled(topk_ids):
        low, high = int(topk_ids.min()), int(topk_ids.max())
        if low < 0 or high >= experts:
            raise InputError(
                f"{where}: topk_ids holds expert ids in [{low}, {high}]; expected [0, {experts - 1}] "
                f"(this layer has {experts} experts): route with the model's own router"
            )


def check_router_logits(layer: NVFP4FusedMoE, x: Any, router_logits: Any) -> None:
    """The arguments of :meth:`NVFP4FusedMoE.forward`: ``x`` floating-point ``[M, H]`` and
    ``router_logits`` floating-point ``[M, E]``, one row per token. Metadata only."""
    where = _check_moe_x(layer, x)
    logits = _tensor(router_logits, "router_logits", where)
    expected = [x.shape[0], layer.num_experts]
    if _shape(logits) != expected:
        raise InputError(
            f"{where}: router_logits has shape {_shape(logits)}; expected {expected} (one row per "
            f"token of x {_shape(x)}, one column per expert of the {layer.num_experts})"
        )
    _floating(logits, "router_logits", where)


def check_float_weights(where: str, dims: int, **weights: Any) -> None:
    """Float weights to quantize, by argument name: floating-point tensors of ``dims``
    dimensions (2: a Linear's ``[N, K]``; 3: experts stacked ``[E, rows, K]``)."""
    for what, weight in weights.items():
        weight = _tensor(weight, what, where)
        if weight.dim() != dims:
            layout = "[N, K]" if dims == 2 else "[E, rows, K] (experts stacked)"
            fix = "; a stack of experts is a MoE layer: use NVFP4FusedMoE.from_float" if weight.dim() == 3 else ""
            raise InputError(f"{where}: {what} has shape {_shape(weight)}; expected {layout}{fix}")
        _floating(weight, what, where)


def check_linear_weight(weight: NVFP4Tensor, layer_name: str | None) -> None:
    """The :class:`NVFP4Tensor` of an :class:`NVFP4Linear`: one matrix (``packed`` 2-D)."""
    packed = weight.packed
    if packed.dim() != 2:
        raise InputError(
            f"{_layer(layer_name, 'NVFP4Linear')}: weight.packed has shape {_shape(packed)}; a "
            "Linear takes one matrix [N, K/2] (experts stacked [E, R, K/2] are a MoE layer: use "
            "NVFP4FusedMoE)"
        )


def check_checkpoint_kind(checkpoint: Checkpoint, name: str, kind: str) -> None:
    """``name`` in ``checkpoint`` is a layer of ``kind`` ("linear" for
    :meth:`NVFP4Linear.from_checkpoint`, "moe" for :meth:`NVFP4FusedMoE.from_checkpoint`).
    A name the checkpoint does not quantize passes here (the loader lists the names it has)."""
    entry = next((e for e in checkpoint.layers() if e.name == name), None)
    if entry is None or entry.kind == kind:
        return
    if entry.kind == "moe":
        raise InputError(
            f"{checkpoint.directory}: {name!r} is a MoE block ({entry.experts} experts); use "
            f"NVFP4FusedMoE.from_checkpoint(checkpoint, {name!r}, top_k=...)"
        )
    raise InputError(
        f"{checkpoint.directory}: {name!r} is a Linear [{entry.n}, {entry.k}], not a MoE block; "
        f"use NVFP4Linear.from_checkpoint(checkpoint, {name!r}), or pass the experts' prefix "
        "(e.g. 'model.layers.0.mlp.experts')"
    )
