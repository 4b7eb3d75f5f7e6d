"""``torch.nn.Module`` front ends: resolve a backend once, ``prepare`` once, ``apply`` per call.

A layer resolves on the device its weights are on, when it is built; moving it afterwards is not
supported (the backend, and the layout ``prepare`` chose, belong to that device): build it where
it will run. ``module.resolution`` says which backend runs it and why.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from quantoracle import layer_inputs
from quantoracle import verify as numerics
from quantoracle.errors import CheckpointFormatError, ProblemError
from quantoracle.oracle import Device, ParallelConfig, Plan, Problem, Resolution, plan
from quantoracle.oracle.engine import ActivationFallback, LayoutPolicy
from quantoracle.oracle.quarantine import add_runtime_entry
from quantoracle.oracle.registry import Registry
from quantoracle.schemes.checkpoint import Checkpoint, LayerEntry
from quantoracle.schemes.scheme import W4A16_NVFP4, Scheme
from quantoracle.schemes.tensors import MoEWeights, NVFP4Tensor

log = logging.getLogger(__name__)

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"activation dtype {dtype}: use torch.bfloat16, torch.float16 or torch.float32") from None


class _ResolvedLayer(nn.Module):
    """What both layers share: plan once on the weights' device, prepare one copy per layout
    the plan holds, check numerics on first use, then pick the bucket from each call's token
    count (a shape, known on the host: no synchronization; a CUDA graph captures one bucket)."""

    plan: Plan

    def _setup(self, weights: Any, problem: Problem, options: dict[str, Any], name: str | None) -> None:
        _check_group(problem, self.group)
        self.layer_name = name
        self.weight_bytes = weights.nbytes
        self._options = options
        self.verification: tuple[numerics.Check, ...] = ()
        policy = numerics.policy(options.get("verify"))
        while True:
            self._prepare(weights, problem)
            if policy == "off" or not self._check(weights, policy):
                break

    def _prepare(self, weights: Any, problem: Problem) -> None:
        self.plan = _plan(problem, self._options)
        prepared: dict[tuple[str, str], Any] = {}
        dispatch = []
        for bucket in self.plan.buckets:
            res = bucket.resolution
            key = (res.layout, res.scheme.name)
            if key not in prepared:
                prepared[key] = res.backend.prepare(weights, res.effective_problem)
            dispatch.append((bucket.max_tokens, res, prepared[key]))
        self._dispatch = tuple(dispatch)
        self._prepared = prepared

    def _check(self, weights: Any, policy: str) -> bool:
        """Probe the plan (:func:`quantoracle.verify.check_layer`); on a failure, quarantine the
        failing candidate (``"first_use"``; returns True: prepare again) or raise (``"strict"``)."""
        failures = [c for c in self.verification if not c.passed]  # from earlier rounds
        checks = numerics.check_layer(self, weights)
        failed = next((c for c in checks if not c.passed), None)
        if failed is None:
            replaced = [dataclasses.replace(c, replaced_by=self.plan.at(c.tokens).label) for c in failures]
            self.verification = (*replaced, *checks)
            return False
        res = self._serve(failed.tokens)[0]
        if policy == "strict" or any(c.label == failed.label for c in failures):
            # a candidate failing again was not removed by its quarantine entry: never loop
            raise numerics.failure_error(failed, res)
        add_runtime_entry(numerics.quarantine_entry(res, failed))
        log.warning("%s: %s; quarantined for this process, planning again", self.layer_name or "layer",
                    failed.describe())
        self.verification = (*failures, failed)
        return True

    def _serve(self, tokens: int) -> tuple[Resolution, Any]:
        for max_tokens, res, prepared in self._dispatch:
            if max_tokens is None or tokens <= max_tokens:
                return res, prepared
        raise AssertionError("a plan covers every token count")  # pragma: no cover

    @property
    def resolution(self) -> Resolution:
        """The resolution of the plan's first bucket (the smallest batches); ``.plan`` has all."""
        return self.plan.first

    @property
    def backend(self) -> str:
        """The first bucket's backend; ``backends`` lists every bucket's candidate."""
        return self.resolution.name

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b.resolution.label for b in self.plan.buckets)

    @property
    def prepared(self) -> Any:
        """The prepared weights of the first bucket's layout."""
        return self._dispatch[0][2]

    @property
    def prepared_bytes(self) -> dict[str, int]:
        """Bytes held per weight layout (tensors reachable from each prepared state)."""
        held: dict[str, int] = {}
        for (layout, _), state in self._prepared.items():
            held[layout] = held.get(layout, 0) + _tensor_bytes(state)
        return held

    def _describe(self) -> str:
        res = self.resolution
        text = f"scheme={res.problem.scheme}, "
        if len(self.plan.buckets) == 1:
            text += f"backend={res.label}"
        else:
            text += "plan=" + " ".join(f"{b.range}:{b.resolution.label}" for b in self.plan.buckets)
        if res.fallback:
            text += f", fallback={res.fallback}"
        if res.problem.parallel != ParallelConfig():
            text += f", parallel={res.problem.parallel.describe(res.problem.kind)}"
        return text


def _tensor_bytes(obj: Any, seen: set | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` through dataclass fields,
    named tuples, tuples, lists and dicts (what prepared states are made of); other objects are
    not entered (they may hold caches, modules or cycles)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if ("storage", storage.data_ptr()) in seen:
            return 0
        seen.add(("storage", storage.data_ptr()))
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_tensor_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    return 0


_RESOLVE_OPTIONS = ("force", "exclude", "activation_fallback", "registry", "layouts", "quarantine", "tuning",
                    "allow_quarantined")


def _plan(problem: Problem, options: dict[str, Any]) -> Plan:
    return plan(problem, **{key: options[key] for key in _RESOLVE_OPTIONS if key in options})


def _linear_problem(scheme: Scheme, device: Any, dtype: torch.dtype, n: int, k: int,
                    parallel: ParallelConfig) -> Problem:
    return Problem(kind="linear", scheme=scheme, device=Device.of(device), dtype=_dtype_name(dtype),
                   n=n, k=k, parallel=parallel)


def _moe_problem(scheme: Scheme, device: Any, dtype: torch.dtype, experts: int, hidden: int,
                 intermediate: int, top_k: int, activation: str, parallel: ParallelConfig) -> Problem:
    return Problem(kind="moe", scheme=scheme, device=Device.of(device), dtype=_dtype_name(dtype),
                   n=intermediate, k=hidden, experts=experts, top_k=top_k, moe_activation=activation,
                   parallel=parallel)


def _check_group(problem: Problem, group: Any) -> None:
    """A sharded layer's process group must hold exactly the ranks its ParallelConfig splits
    over (tp_size for a Linear; tp_size * ep_size for MoE, rank = ep_rank * tp_size + tp_rank)."""
    p = problem.parallel
    ranks, expected = p.group_size, p.group_rank
    if ranks == 1:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ProblemError(f"{p.describe(problem.kind)} needs torch.distributed: call init_process_group first")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size != ranks or rank != expected:
        raise ProblemError(
            f"{p.describe(problem.kind)} (tp_rank={p.tp_rank}, ep_rank={p.ep_rank}) needs a process group of {ranks} ranks "
            f"where this one is rank {expected}; the group has {size} ranks and this is rank {rank}: "
            "pass group= with exactly the layer's ranks, ordered rank = ep_rank * tp_size + tp_rank"
        )


def _entry(checkpoint: Checkpoint, name: str) -> LayerEntry:
    entries = {entry.name: entry for entry in checkpoint.layers()}
    if name not in entries:
        raise CheckpointFormatError(
            f"{checkpoint.directory}: no quantized layer {name!r}; quantized layers: "
            f"{', '.join(list(entries)[:8])}{', ...' if len(entries) > 8 else ''}"
        )
    return entries[name]


def _all_reduce(y: torch.Tensor, group: Any) -> torch.Tensor:
    dist.all_reduce(y, group=group)
    return y


class NVFP4Linear(_ResolvedLayer):
    """``y = x @ W^T (+ bias)`` with NVFP4 weights ``W[N, K]``.

    ``weight`` is the checkpoint's :class:`NVFP4Tensor` (this rank's shard under tensor
    parallelism: rows for ``tp_dim="column"``, columns for ``"row"``). ``forward`` takes
    ``x[..., K]`` in ``dtype`` and returns ``[..., N]``:

    - column-parallel: all-gathered over ``group``; with ``gather_output=False`` this rank's
      ``[..., N/tp]`` instead (to feed a row-parallel layer directly, as Megatron pairs them);
    - row-parallel: the full input, of which the layer takes its K slice, or with
      ``input_is_parallel=True`` that slice itself ``[..., K/tp]``; partial sums all-reduced.

    ``bias`` is that of the returned output. Planning options (``force``, ``exclude``,
    ``activation_fallback``, ``layouts``, ``tuning``, ``quarantine``, ``allow_quarantined``,
    ``registry``) pass through to :func:`quantoracle.plan`; ``verify`` is the numerics check's
    policy (:mod:`quantoracle.verify`). Each call runs the plan's bucket for its token count
    (the rows of ``x``); ``.plan`` shows the buckets, ``.verification`` the checks made.
    """

    def __init__(
        self,
        weight: NVFP4Tensor,
        bias: torch.Tensor | None = None,
        *,
        scheme: Scheme = W4A16_NVFP4,
        dtype: torch.dtype = torch.bfloat16,
        parallel: ParallelConfig = ParallelConfig(),
        group: Any = None,
        force: str | None = None,
        exclude: tuple[str, ...] = (),
        activation_fallback: ActivationFallback = "weight_only",
        layouts: LayoutPolicy = "one",
        tuning: str | None = None,
        quarantine: str | None = None,
        allow_quarantined: bool = False,
        verify: numerics.VerifyPolicy | None = None,
        registry: Registry | None = None,
        name: str | None = None,
        gather_output: bool = True,
        input_is_parallel: bool = False,
    ) -> None:
        layer_inputs.check_linear_weight(weight, name)
        super().__init__()
        column = parallel.tp_dim == "column"
        if (not gather_output and not column) or (input_is_parallel and column):
            raise ProblemError(
                "gather_output=False is for column-parallel layers and input_is_parallel=True for "
                f"row-parallel ones; this layer is tp_dim={parallel.tp_dim!r}"
            )
        self.gather_output, self.input_is_parallel = gather_output, input_is_parallel
        n = weight.rows * (parallel.tp_size if column else 1)
        k = weight.cols * (1 if column else parallel.tp_size)
        problem = _linear_problem(scheme, weight.packed.device, dtype, n, k, parallel)
        self.in_features, self.out_features, self.dtype, self.group = k, n, dtype, group
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        options = dict(force=force, exclude=exclude, activation_fallback=activation_fallback, layouts=layouts,
                       tuning=tuning, quarantine=quarantine, allow_quarantined=allow_quarantined, verify=verify,
                       registry=registry)
        self._setup(weight, problem, options, name)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        scheme: Scheme = W4A16_NVFP4,
        input_amax: float | None = None,
        **options: Any,
    ) -> "NVFP4Linear":
        """Quantize a float ``weight[N, K]`` (ModelOpt numerics) and build the layer on its device.
        W4A4 needs ``input_amax``, the calibrated max |x| of the layer's input."""
        layer_inputs.check_float_weights("NVFP4Linear.from_float", 2, weight=weight)
        amax = None
        if not scheme.weight_only:
            if input_amax is None:
                raise ValueError("a W4A4 scheme needs input_amax (the calibrated max |x| of the input)")
            amax = torch.tensor([float(input_amax)], device=weight.device)
        return cls(NVFP4Tensor.quantize(weight, input_amax=amax), bias, scheme=scheme, **options)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint,
        name: str,
        *,
        device: torch.device | str | None = None,
        parallel: ParallelConfig = ParallelConfig(),
        **options: Any,
    ) -> "NVFP4Linear":
        """Linear ``name`` of a checkpoint, on ``device``, with the checkpoint's scheme (after its
        activation override). Under tensor parallelism only this rank's rows (column-parallel)
        or columns (row-parallel) are read from disk."""
        layer_inputs.check_checkpoint_kind(checkpoint, name, "linear")
        entry = _entry(checkpoint, name)
        # plan before reading: a sharding no backend serves is explained, not half-read
        _plan(_linear_problem(entry.scheme, device or "cpu", options.get("dtype", torch.bfloat16),
                                 entry.n, entry.k, parallel), options)
        shard = None
        if parallel.tp_size > 1:
            dim = "rows" if parallel.tp_dim == "column" else "cols"
            shard = (dim, parallel.tp_rank, parallel.tp_size)
        weight = checkpoint.linear(name, shard=shard)
        if device is not None:
            weight = weight.to(device)
        return cls(weight, scheme=entry.scheme, parallel=parallel, name=name, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., K]`` floating point, at least 2-D (int and bool are refused) -> ``[..., N]``.
        Raises :class:`~quantoracle.errors.InputError` for a wrong shape or dtype
        (:mod:`quantoracle.layer_inputs`). The plan's bucket is picked from the rows of ``x``."""
        layer_inputs.check_linear_input(self, x)
        p = self.resolution.problem.parallel
        if p.tp_size > 1 and p.tp_dim == "row" and not self.input_is_parallel:
            shard = self.in_features // p.tp_size
            x = x[..., p.tp_rank * shard : (p.tp_rank + 1) * shard]
        res, prepared = self._serve(x.numel() // x.shape[-1] if x.shape[-1] else 0)
        y = res.backend.apply(prepared, x.to(self.dtype), variant=res.variant)
        if p.tp_size > 1 and p.tp_dim == "row":
            y = _all_reduce(y.contiguous(), self.group)
        elif p.tp_size > 1 and self.gather_output:
            parts = [torch.empty_like(y) for _ in range(p.tp_size)]
            dist.all_gather(parts, y.contiguous(), group=self.group)
            y = torch.cat(parts, dim=-1)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._describe()}"


class NVFP4FusedMoE(_ResolvedLayer):
    """A Mixture-of-Experts block's experts with NVFP4 weights, and its routing.

    ``weights`` holds this rank's experts (all of them without expert parallelism; with it,
    ``experts / ep_size`` starting at ``weights.first_expert``) and, under tensor parallelism,
    this rank's slice of each expert's intermediate dimension. ``forward(x[M, H],
    router_logits[M, E])`` routes (softmax over all experts in float32, top-k, renormalized
    when ``renormalize``: Qwen3-MoE's ``norm_topk_prob`` and Mixtral's top-k softmax), runs the
    backend, and sums partial results over ``group`` when sharded.
    """

    def __init__(
        self,
        weights: MoEWeights,
        *,
        top_k: int,
        experts: int | None = None,
        scheme: Scheme = W4A16_NVFP4,
        dtype: torch.dtype = torch.bfloat16,
        activation: str = "silu",
        renormalize: bool = True,
        parallel: ParallelConfig = ParallelConfig(),
        group: Any = None,
        force: str | None = None,
        exclude: tuple[str, ...] = (),
        activation_fallback: ActivationFallback = "weight_only",
        layouts: LayoutPolicy = "one",
        tuning: str | None = None,
        quarantine: str | None = None,
        allow_quarantined: bool = False,
        verify: numerics.VerifyPolicy | None = None,
        registry: Registry | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        experts = experts if experts is not None else weights.experts * parallel.ep_size
        problem = _moe_problem(scheme, weights.gate_up.packed.device, dtype, experts, weights.hidden,
                               weights.intermediate * parallel.tp_size, top_k, activation, parallel)
        self.num_experts, self.top_k, self.renormalize = experts, top_k, renormalize
        self.dtype, self.group = dtype, group
        options = dict(force=force, exclude=exclude, activation_fallback=activation_fallback, layouts=layouts,
                       tuning=tuning, quarantine=quarantine, allow_quarantined=allow_quarantined, verify=verify,
                       registry=registry)
        self._setup(weights, problem, options, name)

    @classmethod
    def from_float(
        cls,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        *,
        top_k: int,
        scheme: Scheme = W4A16_NVFP4,
        input_amax: torch.Tensor | None = None,
        **options: Any,
    ) -> "NVFP4FusedMoE":
        """Quantize float experts ``gate_up[E, 2I, H]`` (gate rows first) and ``down[E, H, I]``.
        W4A4 needs ``input_amax`` float32 ``[E, 3]``: max |x| into gate, up and down."""
        layer_inputs.check_float_weights("NVFP4FusedMoE.from_float", 3, gate_up=gate_up, down=down)
        amax = [None, None]
        if not scheme.weight_only:
            if input_amax is None:
                raise ValueError("a W4A4 scheme needs input_amax [E, 3] (gate, up, down input max |x|)")
            amax = [input_amax[:, :2], input_amax[:, 2:]]
        weights = MoEWeights(
            NVFP4Tensor.quantize(gate_up, shards=2, input_amax=amax[0]),
            NVFP4Tensor.quantize(down, input_amax=amax[1]),
        )
        return cls(weights, top_k=top_k, scheme=scheme, **options)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint,
        prefix: str,
        *,
        top_k: int,
        device: torch.device | str | None = None,
        parallel: ParallelConfig = ParallelConfig(),
        **options: Any,
    ) -> "NVFP4FusedMoE":
        """The experts of MoE block ``prefix`` (``...mlp.experts``) of a checkpoint, on
        ``device``. Only this rank's experts (expert parallelism) and intermediate slice (tensor
        parallelism) are read from disk."""
        layer_inputs.check_checkpoint_kind(checkpoint, prefix, "moe")
        entry = _entry(checkpoint, prefix)
        # plan before reading (this also rejects experts not divisible by ep_size)
        _plan(_moe_problem(entry.scheme, device or "cpu", options.get("dtype", torch.bfloat16), entry.experts,
                              entry.hidden, entry.intermediate, top_k, options.get("activation", "silu"), parallel),
                 options)
        experts = None
        if parallel.ep_size > 1:
            local = entry.experts // parallel.ep_size
            experts = range(parallel.ep_rank * local, (parallel.ep_rank + 1) * local)
        tp = (parallel.tp_rank, parallel.tp_size) if parallel.tp_size > 1 else None
        weights = checkpoint.moe(prefix, experts=experts, tp=tp)
        if device is not None:
            weights = weights.to(device)
        return cls(weights, top_k=top_k, experts=entry.experts, scheme=entry.scheme,
                   parallel=parallel, name=prefix, **options)

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(topk_weights float32 [M, k], topk_ids int64 [M, k])`` from logits ``[M, E]``."""
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        layer_inputs.check_router_logits(self, x, router_logits)
        topk_weights, topk_ids = self.route(router_logits)
        return self.forward_routed(x, topk_weights, topk_ids)

    def forward_routed(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The experts alone: ``x[M, H]``, ``topk_weights[M, k]``, global ``topk_ids[M, k]``
        (integer). Raises :class:`~quantoracle.errors.InputError` (:mod:`quantoracle.layer_inputs`):
        shapes and dtypes always; expert-id range on CPU tensors always, on a GPU only with
        ``QUANTORACLE_CHECK_INPUTS=1`` (it would synchronize). The plan's bucket is picked from M."""
        layer_inputs.check_routed_input(self, x, topk_weights, topk_ids)
        res, prepared = self._serve(x.shape[0])
        y = res.backend.apply(prepared, x.to(self.dtype), topk_weights, topk_ids, variant=res.variant)
        p = self.resolution.problem.parallel
        if p.tp_size * p.ep_size > 1:
            y = _all_reduce(y, self.group)
        return y

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, {self._describe()}"
