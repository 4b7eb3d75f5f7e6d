"""Run Hugging Face transformers (>= 5) decoder models, dense and Mixture-of-Experts, on NVFP4
weights.

- :func:`quantize_model` quantizes a model's own 16-bit weights, in place (ModelOpt numerics);
- :func:`load_nvfp4` builds the layers from a ModelOpt (or compressed-tensors) NVFP4 checkpoint;
- :func:`save_nvfp4` quantizes a model's own weights on their device into such a checkpoint;
- :func:`calibrate` records the activation amax W4A4 needs, keyed for each of them.

:func:`quantize_model` and :func:`load_nvfp4` replace every quantized ``nn.Linear`` by
:class:`~quantoracle.layers.NVFP4Linear` and every transformers-5 fused experts module
(``gate_up_proj`` [E, 2I, H], gate rows first; ``down_proj`` [E, H, I]: Qwen3-MoE, Mixtral and
the other models whose experts use ``use_experts_implementation``) by :class:`NVFP4Experts`, and
return a :class:`Summary`. The MoE block's router (``mlp.gate``) is kept: it computes softmax,
top-k and renormalization as before and passes ``(top_k_index, top_k_weights)`` to the experts,
so routing is the model's own by construction. Embeddings, norms, routers and ``lm_head`` are
never replaced.

Dense models (Llama, Mistral, Qwen2, Qwen3, ...) have only Linear projections to replace; MoE
models may add dense layers (Qwen3-MoE's ``mlp_only_layers``) and shared experts (Qwen2-MoE's
``shared_expert``), which are Linears too. A module holding weights quantoracle cannot run (stacked
experts in another layout, transformers' ``Conv1D``) raises UnsupportedModelError naming it, unless
excluded; so does a checkpoint layer no module of the model takes.

Layers resolve their backend on the device and in the dtype of the parameters they replace:
move the model to its device and dtype first; moving it afterwards is not supported.

``progress=True`` (the default) shows a progress bar on stderr while modules are replaced or
calibration batches run; it stays off when stderr is not a terminal.
"""

from __future__ import annotations

import inspect
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantoracle.errors import (
    CalibrationError,
    CheckpointFormatError,
    SchemeError,
    UnsupportedModelError,
)
from quantoracle.layers import NVFP4FusedMoE, NVFP4Linear
from quantoracle.oracle import Resolution
from quantoracle.oracle.spec import LayerKind
from quantoracle.schemes.checkpoint import (
    DEFAULT_EXCLUDE,
    Checkpoint,
    LayerEntry,
    QuantizeSummary,
    write_checkpoint,
)
from quantoracle.schemes.checkpoint.config import ActivationOverride, matches
from quantoracle.schemes.checkpoint.layout import EXPERT_MODULE, Format
from quantoracle.schemes.keys import NVFP4_WEIGHT
from quantoracle.schemes.scheme import Scheme

try:
    from transformers.activations import GELUActivation, SiLUActivation
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.pytorch_utils import Conv1D
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "quantoracle.integrations.transformers needs transformers >= 5: "
        "pip install 'quantoracle[transformers]'"
    ) from error

ROLES = ("gate", "up", "down")


# ---- what was replaced ----


@dataclass(frozen=True)
class ReplacedLayer:
    """One replaced module: its name in the model, ``kind`` ("linear" or "moe"), the scheme
    asked for, the backend that runs it and the activation fallback taken (or None)."""

    name: str
    kind: LayerKind
    scheme: str
    backend: str
    fallback: str | None

    @classmethod
    def of(cls, name: str, kind: LayerKind, resolution: Resolution) -> "ReplacedLayer":
        return cls(name, kind, resolution.problem.scheme.name, resolution.name, resolution.fallback)


@dataclass(frozen=True)
class Summary:
    """What :func:`quantize_model` or :func:`load_nvfp4` did.

    ``replaced``: every replaced module, in model order. ``untouched``: the Linear and experts
    modules left 16-bit (excluded from quantization, e.g. ``lm_head``). ``str(summary)`` groups
    them by kind, scheme, backend and fallback; :meth:`to_dict` is JSON-ready.
    """

    replaced: tuple[ReplacedLayer, ...]
    untouched: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        replaced = [asdict(layer) for layer in self.replaced]
        return {"replaced": replaced, "untouched": list(self.untouched)}

    def __str__(self) -> str:
        groups: dict[tuple[str, str, str, str | None], list[str]] = defaultdict(list)
        for layer in self.replaced:
            groups[(layer.kind, layer.scheme, layer.backend, layer.fallback)].append(layer.name)
        counts = f"{len(self.replaced)} modules replaced, {len(self.untouched)} left 16-bit"
        lines = [f"quantoracle: {counts}"]
        for (kind, scheme, backend, fallback), names in groups.items():
            served = f" (fallback: {fallback})" if fallback else ""
            lines.append(f"  {kind} {scheme} on {backend}{served}: {len(names)}")
            lines += [f"    {pattern}" for pattern in _collapse(names)]
        if self.untouched:
            lines.append(f"  16-bit: {len(self.untouched)}")
            lines += [f"    {pattern}" for pattern in _collapse(self.untouched)]
        return "\n".join(lines)


_INDEX = re.compile(r"\.(\d+)\.")


def _collapse(names: Iterable[str]) -> list[str]:
    """Names that differ only in their first index, one line each:
    ``model.layers.{0-3,5}.mlp.experts``."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for name in names:
        found = _INDEX.search(name)
        if found is None:
            groups[(name, "")] = []
        else:
            groups[(name[: found.start(1)], name[found.end(1) :])].append(int(found[1]))
    return [head + _ranges(indices) + tail for (head, tail), indices in groups.items()]


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``{0-2,5}``; one index as is; none as ``""``."""
    values = sorted(set(indices))
    if len(values) < 2:
        return "".join(map(str, values))
    runs = [[values[0], values[0]]]
    for value in values[1:]:
        if value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return "{" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) + "}"


# ---- the modules of a model ----


class NVFP4Experts(nn.Module):
    """Drop-in replacement for a transformers-5 fused experts module.

    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` in
    ``hidden_states.dtype``: the signature of the module it replaces, called by the MoE block
    with its router's output, and run by :meth:`NVFP4FusedMoE.forward_routed` (router weights
    applied in float32). Ids must lie in ``[0, E)``: this integration runs on one device, without
    transformers' expert parallelism and its out-of-range sentinel ids (InputError, see
    :mod:`quantoracle.layer_inputs`).
    """

    def __init__(self, moe: NVFP4FusedMoE) -> None:
        super().__init__()
        self.moe = moe
        self.num_experts = moe.num_experts

    @property
    def resolution(self) -> Resolution:
        return self.moe.resolution

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return self.moe.forward_routed(hidden_states, top_k_weights, top_k_index).to(hidden_states.dtype)


_EXPERTS_LAYOUT = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True}
"""The attributes ``use_experts_implementation`` sets, with the values quantoracle's layout needs."""


@dataclass(frozen=True)
class _Target:
    """A module quantoracle could replace: ``kind`` "linear" (``nn.Linear``) or "moe" (fused
    experts); ``unsupported`` says why experts in another layout cannot be (None if they can)."""

    name: str
    kind: LayerKind
    unsupported: str | None = None

    def check(self) -> None:
        if self.unsupported:
            raise UnsupportedModelError(self.unsupported)


def _checked_model(model: Any, what: str) -> None:
    """UnsupportedModelError unless ``model`` is a transformers model (a module with a config)."""
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not hasattr(config, "get_text_config"):
        raise UnsupportedModelError(
            f"{what} patches a transformers model (a PreTrainedModel, which has .config); got "
            f"{type(model).__name__} without one: build it with AutoModelForCausalLM.from_config(config) "
            "or from_pretrained, or build quantoracle.layers.NVFP4Linear / NVFP4FusedMoE directly"
        )


def _targets(model: nn.Module) -> list[_Target]:
    """Every module holding weights quantoracle could quantize, in model order: ``nn.Linear``,
    fused experts (3-D ``gate_up_proj`` and ``down_proj``), and, marked unsupported, other
    modules with stacked (3-D or more) parameters and transformers' ``Conv1D``. Embeddings,
    norms, convolutions and routers that are not ``nn.Linear`` are none of these.
    UnsupportedModelError for parameters on the meta device."""
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise UnsupportedModelError(
            f"{len(meta)} parameters are on the meta device (e.g. {meta[0]}); build the model on "
            "its device first (e.g. AutoModelForCausalLM.from_config(config, dtype=...).to(device))"
        )
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found.append(_Target(name, "linear"))
        elif _is_fused_experts(module):
            found.append(_Target(name, "moe", _experts_layout_problem(name, module)))
        elif isinstance(module, Conv1D):
            found.append(_Target(name, "linear", (
                f"{name} (transformers Conv1D, the GPT-2 family's transposed Linear): quantoracle "
                "replaces nn.Linear modules; leave it 16-bit (exclude_modules)"
            )))
        elif not isinstance(module, nn.modules.conv._ConvNd) and _stacked(module):
            found.append(_Target(name, "moe", (
                f"{name} ({type(module).__name__}) holds stacked weights {_stacked(module)} in a "
                "layout quantoracle does not know (it runs fused experts with gate_up_proj "
                "[E, 2I, H] and down_proj [E, H, I]); leave it 16-bit (exclude_modules)"
            )))
    return found


def _stacked(module: nn.Module) -> dict[str, list[int]]:
    """The module's own parameters of 3 or more dimensions, name -> shape."""
    return {n: list(p.shape) for n, p in module.named_parameters(recurse=False) if p.dim() >= 3}


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    tensors = isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
    return tensors and gate_up.dim() == down.dim() == 3


def _experts_layout_problem(name: str, module: nn.Module) -> str | None:
    wrong = {k: getattr(module, k) for k, v in _EXPERTS_LAYOUT.items() if getattr(module, k, v) != v}
    (e, two_i, h), (e2, h2, i) = module.gate_up_proj.shape, module.down_proj.shape
    if not wrong and (e2, h2, two_i) == (e, h, 2 * i):
        return None
    return (
        f"{name} ({type(module).__name__}): quantoracle runs fused experts with gate_up_proj "
        f"[E, 2I, H] (gate rows first, no bias) and down_proj [E, H, I]; found gate_up_proj "
        f"{[e, two_i, h]}, down_proj {[e2, h2, i]}{f', {wrong}' if wrong else ''}. Leave this "
        "module 16-bit (exclude_modules, or a checkpoint that excludes it)"
    )


def _moe_activation(name: str, module: nn.Module) -> str:
    act = getattr(module, "act_fn", None)
    if isinstance(act, (SiLUActivation, nn.SiLU)):
        return "silu"
    if type(act) is GELUActivation:
        return "gelu"
    raise UnsupportedModelError(
        f"{name}: experts activation {type(act).__name__} is not supported (silu or exact gelu); "
        "leave this module 16-bit"
    )


def _top_k(model: nn.Module, name: str) -> int:
    """The router's top-k for experts module ``name``, from the config's ``num_experts_per_tok``."""
    config = model.config.get_text_config()
    top_k = getattr(config, "num_experts_per_tok", None)
    if not isinstance(top_k, int):
        raise UnsupportedModelError(
            f"{name}: {type(config).__name__} has no integer num_experts_per_tok; quantoracle reads "
            "the router's top-k of fused experts from it (leave the experts 16-bit: exclude_modules)"
        )
    return top_k


def _progress(items: Iterable[Any], enabled: bool, desc: str, unit: str) -> Iterable[Any]:
    """``items`` with a progress bar on stderr when ``enabled`` and stderr is a terminal."""
    return tqdm(items, desc=desc, unit=unit, disable=None if enabled else True, leave=False)


def _exclusions(exclude_modules: Iterable[str], default_exclude: bool) -> tuple[str, ...]:
    """The module-name patterns left 16-bit: ``exclude_modules`` added to ``DEFAULT_EXCLUDE``
    (``lm_head``, embeddings, routers), or alone with ``default_exclude=False``, as the
    checkpoint writer reads its ``exclude``."""
    return (*DEFAULT_EXCLUDE, *exclude_modules) if default_exclude else tuple(exclude_modules)


def _excluded(name: str, patterns: Iterable[str]) -> bool:
    return any(matches(name, pattern) for pattern in patterns)


def _layer_options(name: str, scheme: Scheme, options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of layer ``name``: its scheme and name, and the resolution options,
    where ``force`` may map module-name globs to backends (the first matching pattern wins; a
    layer no pattern names resolves as usual)."""
    force = options.get("force")
    if isinstance(force, Mapping):
        force = next((backend for pattern, backend in force.items() if matches(name, pattern)), None)
    return {**options, "force": force, "scheme": scheme, "name": name}


# ---- how save_pretrained names the model's tensors ----


class _SavedNames:
    """Where each tensor of the model goes in a checkpoint that ``save_pretrained`` wrote.

    transformers 5 renames and splits tensors on save (Mixtral's ``mlp.experts.gate_up_proj``
    [E, 2I, H] becomes ``block_sparse_moe.experts.{e}.w1.weight`` and ``.w3.weight``). Rather
    than restate those rules, this runs transformers' own reversal (``revert_weight_conversion``)
    on a probe: a state dict of tiny tensors holding one distinct id per saved piece (per expert
    and projection for fused experts), and reads back where each id went.

    ``saved[key]``: ``(saved tensor name, index into the model tensor key)`` pairs, the index
    ``()`` for a whole tensor and ``(e, rows)`` / ``(e,)`` for an expert's gate or up rows / down.
    """

    def __init__(self, model: nn.Module, targets: list[_Target]) -> None:
        self.shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
        experts = [t.name for t in targets if t.kind == "moe" and not t.unsupported]
        self.fused = {f"{name}.{param}" for name in experts for param in ("gate_up_proj", "down_proj")}
        self._owner: list[tuple[str, tuple]] = []
        probes = {key: self._probe(key, shape, key in self.fused) for key, shape in self.shapes.items()}
        self.saved: dict[str, list[tuple[str, tuple]]] = defaultdict(list)
        for saved, value in revert_weight_conversion(model, probes).items():
            if value.numel() != 1:
                raise UnsupportedModelError(
                    f"transformers saves {saved} from several model tensors; quantoracle cannot map "
                    "this model's checkpoint names"
                )
            key, index = self._owner[int(value.item())]
            self.saved[key].append((saved, index))

    def _probe(self, key: str, shape: tuple[int, ...], fused: bool) -> torch.Tensor:
        if not fused:
            pieces, probe_shape = [()], (1,) * len(shape)
        elif key.endswith("gate_up_proj"):
            half = shape[1] // 2
            pieces = [(e, slice(r * half, (r + 1) * half)) for e in range(shape[0]) for r in (0, 1)]
            probe_shape = (shape[0], 2, 1)
        else:
            pieces, probe_shape = [(e,) for e in range(shape[0])], (shape[0], 1, 1)
        first = len(self._owner)
        self._owner += [(key, piece) for piece in pieces]
        return torch.arange(first, len(self._owner), dtype=torch.float32).reshape(probe_shape)

    def linear(self, name: str) -> str | None:
        """The saved module name of Linear ``name``."""
        saved = self.saved.get(f"{name}.weight", [])
        return saved[0][0].removesuffix(".weight") if len(saved) == 1 else None

    def experts(self, name: str) -> list[dict[str, str]]:
        """Per expert, role (gate, up, down) -> the saved module name of experts module ``name``
        (in the supported layout)."""
        experts: list[dict[str, str]] = [{} for _ in range(self.shapes[f"{name}.down_proj"][0])]
        for param in ("gate_up_proj", "down_proj"):
            for saved, (e, *rows) in self.saved[f"{name}.{param}"]:
                role = "down" if not rows else ("gate" if rows[0].start == 0 else "up")
                experts[e][role] = saved.removesuffix(".weight")
        return experts

    def moe_prefix(self, name: str) -> str | None:
        """The saved block prefix (``...experts``) of experts module ``name``, as the checkpoint
        reader groups experts; None for experts in a layout quantoracle cannot run."""
        if f"{name}.gate_up_proj" not in self.fused:
            return None
        found = EXPERT_MODULE.match(self.experts(name)[0].get("gate", ""))
        return found["prefix"] if found else None


# ---- calibration ----


@dataclass(frozen=True)
class Calibration:
    """The max |x| into each quantizable module of a model (see :func:`calibrate`).

    - ``modules``: model module name -> float32 tensor: ``[]`` for an ``nn.Linear``, ``[E, 3]``
      (gate, up, down input of each expert) for fused experts; :func:`quantize_model` reads it.
    - ``checkpoint``: the same values keyed by the module names ``save_pretrained`` writes, one
      per expert and projection (e.g. Mixtral's ``model.layers.0.block_sparse_moe.experts.3.w1``):
      ``input_amax`` for :func:`quantoracle.schemes.checkpoint.quantize_checkpoint`.
    """

    modules: dict[str, torch.Tensor]
    checkpoint: dict[str, float]


class _LinearAmax:
    def __init__(self) -> None:
        self.amax: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["input"]
        found = x.detach().abs().amax().float()
        self.amax = found if self.amax is None else torch.maximum(self.amax, found)

    def result(self) -> torch.Tensor | None:
        return None if self.amax is None else self.amax.cpu()


class _ExpertsAmax:
    """Per expert: gate and up share one input, the hidden states of the tokens routed to the
    expert; down's input is ``act(gate) * up``, recomputed here from the module's own weights in
    the model's dtype, as transformers' eager experts forward computes it. An expert no
    calibration token reached takes the layer's max over experts (ModelOpt's fused-experts
    exports share one input_scale per projection across all experts of a layer)."""

    def __init__(self, module: nn.Module) -> None:
        self.signature = inspect.signature(module.forward)
        experts = module.gate_up_proj.shape[0]
        self.amax = torch.zeros(experts, 2)
        self.seen = torch.zeros(experts, dtype=torch.bool)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self.signature.bind(*args, **kwargs).arguments
        x, ids = bound["hidden_states"].detach(), bound["top_k_index"]
        for e in torch.unique(ids).tolist():
            if not 0 <= e < len(self.seen):
                continue
            xe = x[(ids == e).any(dim=-1)]
            gate, up = F.linear(xe, module.gate_up_proj[e]).chunk(2, dim=-1)
            found = torch.stack([xe.abs().amax(), (module.act_fn(gate) * up).abs().amax()]).float().cpu()
            self.amax[e] = torch.maximum(self.amax[e], found)
            self.seen[e] = True

    def result(self) -> torch.Tensor | None:
        if not self.seen.any():
            return None
        amax = torch.where(self.seen[:, None], self.amax, self.amax[self.seen].amax(dim=0))
        return torch.stack([amax[:, 0], amax[:, 0], amax[:, 1]], dim=-1)


def _batches(input_ids: torch.Tensor | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    if isinstance(input_ids, torch.Tensor):
        return [input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)]
    return input_ids


def calibrate(
    model: nn.Module, input_ids: torch.Tensor | Iterable[torch.Tensor], *, progress: bool = True
) -> Calibration:
    """Run the 16-bit ``model`` on ``input_ids`` (a LongTensor ``[B, T]`` or ``[T]``, or an
    iterable of such batches) and record the max |x| into every ``nn.Linear`` and, per expert
    and projection, into every fused experts module quantoracle can run (others are skipped).
    Forward pre-hooks; nothing is modified. A module no token reached (e.g. a vision tower's
    under text input) has no entry. ``progress``: a bar over the batches (see the module
    docstring). UnsupportedModelError for a module that is not a transformers model.
    """
    _checked_model(model, "calibrate")
    targets = [target for target in _targets(model) if not target.unsupported]
    recorders: dict[str, _LinearAmax | _ExpertsAmax] = {}
    handles = []
    for target in targets:
        module = model.get_submodule(target.name)
        recorder = _LinearAmax() if target.kind == "linear" else _ExpertsAmax(module)
        recorders[target.name] = recorder
        handles.append(module.register_forward_pre_hook(recorder, with_kwargs=True))
    device = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            for batch in _progress(_batches(input_ids), progress, "calibrate", "batch"):
                model(input_ids=batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    results = {name: recorder.result() for name, recorder in recorders.items()}
    modules = {name: amax for name, amax in results.items() if amax is not None}
    names = _SavedNames(model, targets)
    checkpoint: dict[str, float] = {}
    for target in targets:
        amax = modules.get(target.name)
        if amax is None:
            continue
        if target.kind == "linear":
            checkpoint[names.linear(target.name) or target.name] = float(amax)
            continue
        for e, projections in enumerate(names.experts(target.name)):
            for column, role in enumerate(ROLES):
                checkpoint[projections[role]] = float(amax[e, column])
    return Calibration(modules, checkpoint)


# ---- replacing ----


def _checked_scheme(scheme: Scheme | str, calibration_input_ids: Any, what: str) -> Scheme:
    scheme = Scheme.from_name(scheme) if isinstance(scheme, str) else scheme
    if scheme.weight != NVFP4_WEIGHT:
        raise SchemeError(f"{what} writes NVFP4 weights; scheme {scheme}: use w4a16_nvfp4 or w4a4_nvfp4")
    if not scheme.weight_only and calibration_input_ids is None:
        raise SchemeError(
            f"{scheme} quantizes activations with a static global scale: pass "
            "calibration_input_ids (a few hundred representative tokens), or use w4a16_nvfp4"
        )
    return scheme


def quantize_model(
    model: nn.Module,
    scheme: Scheme | str,
    *,
    calibration_input_ids: torch.Tensor | Iterable[torch.Tensor] | None = None,
    exclude_modules: tuple[str, ...] = (),
    default_exclude: bool = True,
    progress: bool = True,
    **resolve_options: Any,
) -> Summary:
    """Quantize ``model`` in place from its own 16-bit weights (ModelOpt numerics; each Linear
    gets its own ``weight_scale_2``, gate and up of an expert share one) and replace the
    modules as the module docstring says.

    ``scheme``: ``"w4a16_nvfp4"`` or ``"w4a4_nvfp4"`` (or the :class:`Scheme`). W4A4 needs
    ``calibration_input_ids`` (see :func:`calibrate`), run on the 16-bit model first.
    ``exclude_modules``: module-name globs left 16-bit in addition to ``DEFAULT_EXCLUDE``
    (``lm_head``, embeddings, routers); ``default_exclude=False`` leaves only them.
    ``progress``: a bar over the modules (and calibration batches), see the module docstring.
    ``resolve_options`` (``force`` — a backend, or a mapping from module-name glob to
    backend —, ``exclude``, ``activation_fallback``, ``registry``) go to each layer's resolve.
    Raises SchemeError for another scheme or W4A4 without calibration input, CalibrationError
    for a module the calibration input never reached, UnsupportedModelError (see the class).
    """
    _checked_model(model, "quantize_model")
    scheme = _checked_scheme(scheme, calibration_input_ids, "quantize_model")
    amax = {} if scheme.weight_only else calibrate(model, calibration_input_ids, progress=progress).modules
    excluded = _exclusions(exclude_modules, default_exclude)
    replaced, untouched = [], []
    for target in _progress(_targets(model), progress, "quantize_model", "module"):
        if _excluded(target.name, excluded):
            untouched.append(target.name)
            continue
        target.check()
        if not scheme.weight_only and target.name not in amax:
            raise CalibrationError(
                f"no calibration token reached {target.name}; pass calibration_input_ids that run "
                "through it, or leave it 16-bit (exclude_modules)"
            )
        module = model.get_submodule(target.name)
        options = _layer_options(target.name, scheme, resolve_options)
        if target.kind == "linear":
            layer = NVFP4Linear.from_float(
                module.weight.detach(), None if module.bias is None else module.bias.detach(),
                input_amax=None if scheme.weight_only else float(amax[target.name]),
                dtype=module.weight.dtype, **options,
            )
        else:
            moe = NVFP4FusedMoE.from_float(
                module.gate_up_proj.detach(), module.down_proj.detach(), top_k=_top_k(model, target.name),
                input_amax=amax.get(target.name), dtype=module.gate_up_proj.dtype,
                activation=_moe_activation(target.name, module), **options,
            )
            layer = NVFP4Experts(moe)
        model.set_submodule(target.name, layer)
        replaced.append(ReplacedLayer.of(target.name, target.kind, layer.resolution))
    return Summary(tuple(replaced), tuple(untouched))


def save_nvfp4(
    model: nn.Module,
    dst_dir: str | Path,
    scheme: Scheme | str,
    *,
    calibration_input_ids: torch.Tensor | Iterable[torch.Tensor] | None = None,
    exclude_modules: tuple[str, ...] = (),
    default_exclude: bool = True,
    format: Format = "modelopt",
    **write_options: Any,
) -> QuantizeSummary:
    """Quantize the 16-bit ``model``'s weights where they are (a GPU quantizes large models in
    seconds) and write a checkpoint to ``dst_dir``: the tensors ``save_pretrained`` would write
    (its names, e.g. Mixtral's ``block_sparse_moe.experts.{e}.w1``; tied duplicates dropped),
    quantized by :func:`quantoracle.schemes.checkpoint.write_checkpoint` in ``format``, with
    ``config.json``. The result equals ``save_pretrained`` followed by ``quantize_checkpoint``.
    Returns the writer's :class:`QuantizeSummary` (it stands for the checkpoint's path).
    ``exclude_modules`` and ``default_exclude`` as for :func:`quantize_model` (matched against
    the names ``save_pretrained`` writes, which are the model's for dense models and
    Qwen-family MoE).

    W4A4 calibrates on ``calibration_input_ids`` first (see :func:`calibrate`).
    ``write_options`` (``max_shard_bytes``, ``progress``) go to ``write_checkpoint``; ``progress``
    also to the calibration. Raises UnsupportedModelError for a model already patched or holding
    a module quantoracle cannot run that ``exclude_modules`` does not exclude (see
    :func:`quantize_model`), and like ``write_checkpoint``.
    """
    _checked_model(model, "save_nvfp4")
    scheme = _checked_scheme(scheme, calibration_input_ids, "save_nvfp4")
    patched = [n for n, m in model.named_modules() if isinstance(m, (NVFP4Linear, NVFP4Experts))]
    if patched:
        raise UnsupportedModelError(
            f"{patched[0]} is already an NVFP4 module; save_nvfp4 quantizes a 16-bit model"
        )
    for target in _targets(model):
        if not _excluded(target.name, _exclusions(exclude_modules, default_exclude)):
            target.check()
    progress = write_options.get("progress", False)
    input_amax = None if scheme.weight_only else calibrate(model, calibration_input_ids, progress=progress).checkpoint
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        storage = (tensor.device, tensor.data_ptr(), tensor.shape)
        if storage not in seen:
            seen.add(storage)
            state[key] = tensor
    return write_checkpoint(
        dst_dir, revert_weight_conversion(model, state), scheme, format=format,
        exclude=exclude_modules, default_exclude=default_exclude, input_amax=input_amax,
        config=model.config.to_dict(),
        **{"progress": False, **write_options},
    )


def load_nvfp4(
    model: nn.Module,
    checkpoint_dir: str | Path,
    *,
    override_activation: ActivationOverride | None = None,
    progress: bool = True,
    **resolve_options: Any,
) -> Summary:
    """Patch ``model`` in place to run the NVFP4 checkpoint in ``checkpoint_dir``.

    ``model`` is the checkpoint's architecture, built on its device in its activation dtype
    (``AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to("cuda")`` will do: its
    weights are overwritten). Every module the checkpoint quantizes is replaced, built from the
    checkpoint's tensors; every other tensor the checkpoint holds (embeddings, norms, routers,
    ``lm_head``, biases) is copied into the model's own parameters, whose modules stay.
    Checkpoint names are matched as ``save_pretrained`` writes them (e.g. Mixtral's
    ``block_sparse_moe.experts.{e}.w1``) or as the model names them.

    ``override_activation="none"`` serves a W4A4 checkpoint weight-only. ``progress``: a bar over
    the modules, see the module docstring. ``resolve_options`` as for :func:`quantize_model`.
    Raises CheckpointFormatError when the checkpoint lacks a tensor the model needs or shapes
    disagree, UnsupportedModelError for a model that is not a transformers model and for a
    layer the checkpoint quantizes that no module of the model can take (naming both), and what
    the checkpoint reader raises.
    """
    _checked_model(model, "load_nvfp4")
    targets = _targets(model)
    names = _SavedNames(model, targets)
    replaced, untouched, owned = [], [], set()
    with Checkpoint.open(checkpoint_dir, override_activation) as checkpoint:
        entries = {entry.name: entry for entry in checkpoint.layers()}
        taken = set()
        for target in _progress(targets, progress, "load_nvfp4", "module"):
            linear = target.kind == "linear"
            saved = names.linear(target.name) if linear else names.moe_prefix(target.name)
            found = [n for n in (saved, target.name) if n in entries and entries[n].kind == target.kind]
            entry = entries[found[0]] if found else None
            if entry is None:
                untouched.append(target.name)
                continue
            target.check()
            taken.add(entry.name)
            options = _layer_options(target.name, entry.scheme, resolve_options)
            module = model.get_submodule(target.name)
            if target.kind == "linear":
                layer = _linear_from(checkpoint, entry, module, options)
            else:
                layer = _experts_from(checkpoint, entry, target.name, module, _top_k(model, target.name), options)
            model.set_submodule(target.name, layer)
            owned.update(key for key in names.shapes if key.startswith(target.name + "."))
            replaced.append(ReplacedLayer.of(target.name, target.kind, layer.resolution))
        _check_all_taken(model, names, checkpoint, [entries[n] for n in entries if n not in taken])
        _copy_unquantized(model, names, checkpoint, owned)
    return Summary(tuple(replaced), tuple(untouched))


def _linear_from(
    checkpoint: Checkpoint, entry: LayerEntry, module: nn.Linear, options: dict[str, Any]
) -> NVFP4Linear:
    if (entry.n, entry.k) != (module.out_features, module.in_features):
        raise CheckpointFormatError(
            f"{checkpoint.directory}: {entry.name} is [{entry.n}, {entry.k}] but the model's "
            f"{options['name']} is [{module.out_features}, {module.in_features}]; load the checkpoint "
            "into the model it was made from (same config)"
        )
    bias = module.bias
    if f"{entry.name}.bias" in checkpoint.files:
        bias = checkpoint.files[f"{entry.name}.bias"]
    weight = checkpoint.linear(entry.name).to(module.weight.device)
    bias = None if bias is None else bias.detach().to(module.weight.device)
    return NVFP4Linear(weight, bias, dtype=module.weight.dtype, **options)


def _experts_from(
    checkpoint: Checkpoint,
    entry: LayerEntry,
    name: str,
    module: nn.Module,
    top_k: int,
    options: dict[str, Any],
) -> NVFP4Experts:
    experts, two_i, hidden = module.gate_up_proj.shape
    if (entry.experts, entry.hidden, 2 * entry.intermediate) != (experts, hidden, two_i):
        raise CheckpointFormatError(
            f"{checkpoint.directory}: {entry.name} has {entry.experts} experts of hidden "
            f"{entry.hidden}, intermediate {entry.intermediate}; the model's {name} has {experts} "
            f"of {hidden}, {two_i // 2}; load the checkpoint into the model it was made from"
        )
    weights = checkpoint.moe(entry.name).to(module.gate_up_proj.device)
    moe = NVFP4FusedMoE(
        weights, top_k=top_k, dtype=module.gate_up_proj.dtype,
        activation=_moe_activation(name, module), **options,
    )
    return NVFP4Experts(moe)


def _check_all_taken(model: nn.Module, names: _SavedNames, checkpoint: Checkpoint, left: list[LayerEntry]) -> None:
    """UnsupportedModelError for the first checkpoint layer no module of ``model`` took, naming
    the model's module that saves under that name, if any, and its type."""
    if not left:
        return
    entry = left[0]
    holder = next(
        (key.rsplit(".", 1)[0] for key, pieces in names.saved.items()
         for saved, _ in pieces if saved.startswith(entry.name + ".")),
        None,
    )
    found = (
        f"the model's {holder} ({type(model.get_submodule(holder)).__name__}) is not a module that "
        f"takes it (quantoracle replaces nn.Linear modules and transformers-5 fused experts)"
        if holder else f"{type(model).__name__} has no module saved under that name"
    )
    raise UnsupportedModelError(
        f"{checkpoint.directory}: the checkpoint quantizes {entry.kind} {entry.name}"
        f"{f' and {len(left) - 1} more layers' if len(left) > 1 else ''} that this model cannot take: "
        f"{found}. Build the model from the checkpoint's config.json"
    )


def _copy_unquantized(
    model: nn.Module, names: _SavedNames, checkpoint: Checkpoint, owned: set[str]
) -> None:
    """Copy every checkpoint tensor of a tensor the model keeps into it (cast to its dtype);
    CheckpointFormatError for one the checkpoint lacks, unless tied to one that was copied."""
    files = checkpoint.files
    current = model.state_dict(keep_vars=True)
    copied, missing = set(), []
    with torch.no_grad():
        for key in names.shapes.keys() - owned:
            target = current[key]
            sources = [(key, ())] if key in files else names.saved[key]
            for saved, index in sources:
                if saved not in files:
                    missing.append((key, saved))
                    continue
                tensor = files[saved]
                if tensor.shape != target[index].shape:
                    raise CheckpointFormatError(
                        f"{files.where(saved)}: shape {list(tensor.shape)}, the model's {key} "
                        f"needs {list(target[index].shape)}; load the checkpoint into the model it "
                        "was made from"
                    )
                target[index].copy_(tensor)
                copied.add(target.data_ptr())
    missing = [(key, saved) for key, saved in missing if current[key].data_ptr() not in copied]
    if missing:
        raise CheckpointFormatError(
            f"{checkpoint.directory}: no tensor {missing[0][1]} for the model's {missing[0][0]} "
            f"({len(missing)} missing); load the checkpoint into the model it was made from"
        )


__all__ = [
    "Calibration",
    "CalibrationError",
    "NVFP4Experts",
    "ReplacedLayer",
    "Summary",
    "UnsupportedModelError",
    "calibrate",
    "load_nvfp4",
    "quantize_model",
    "save_nvfp4",
]
