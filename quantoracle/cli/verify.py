"""``quantoracle verify CKPT``: the numerics check (:mod:`quantoracle.verify`) on every distinct
quantized layer of a checkpoint, on its real weights, as a table; exit code 1 on any failure."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantoracle._version import __version__
from quantoracle.cli.options import TORCH_DEVICES, add_json, positive_int, torch_device
from quantoracle.oracle.spec import ACTIVATION_DTYPES, ActivationDtype
from quantoracle.report import table

HELP = "check every distinct quantized layer of a checkpoint against the exact reference"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify", help=HELP,
        description="Resolve every quantized layer of a checkpoint directory (grouped as `resolve` groups "
                    "them), build one layer per group from its first layer's weights on the device, run the "
                    "numerics check of verify='first_use' on it (probe batches through the chosen backend of "
                    "each plan bucket and through `reference`) and print a table: layer group, backend per "
                    "probed batch size, relative error, tolerance, seconds. Nothing is quarantined: it "
                    "reports. Exit code 1 when a check fails or a layer has no backend.")
    parser.add_argument("path", help="a quantized checkpoint directory on this machine")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help=f"where to build and check the layers: {TORCH_DEVICES} (default: cuda if present, "
                             "else cpu, where every layer is served by reference and nothing is compared)")
    parser.add_argument("--dtype", default="bfloat16", choices=ACTIVATION_DTYPES, help="activation dtype")
    parser.add_argument("--top-k", type=positive_int, default=None,
                        help="experts per token (default: config.json's num_experts_per_tok, else 8)")
    add_json(parser, "every group with its plan and checks")
    parser.set_defaults(run=run)


@dataclass
class GroupVerification:
    """One group of identical layers: its names, problem, the plan its checked layer got, the
    checks made on it (empty: served by ``reference`` alone), or the error that stopped it."""

    names: list[str]
    problem: Any
    plan: Any = None
    checks: tuple = ()
    error: Exception | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or any(not c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        checks = [{**asdict(c), "error": c.error if math.isfinite(c.error) else None,
                   "finite": math.isfinite(c.error)} for c in self.checks]
        return {
            "layers": self.names, "kind": self.problem.kind, "problem": self.problem.model_dump(mode="json"),
            "plan": None if self.plan is None else [b.to_dict() for b in self.plan.buckets],
            "checks": checks, "failed": self.failed,
            "error": None if self.error is None else {"type": type(self.error).__name__, "message": str(self.error)},
        }


@dataclass
class CheckpointVerification:
    directory: str
    device: str
    dtype: ActivationDtype
    groups: list[GroupVerification] = field(default_factory=list)

    @property
    def failed(self) -> list[GroupVerification]:
        return [g for g in self.groups if g.failed]

    @property
    def compared(self) -> bool:
        """Whether any check compared a backend with ``reference`` at all."""
        return any(g.checks for g in self.groups)


def verify_checkpoint(directory: str | Path, device: Any, *, dtype: ActivationDtype = "bfloat16",
                      top_k: int | None = None, registry: Any = None) -> CheckpointVerification:
    """Check one layer per group of :func:`~quantoracle.checkpoint_resolution.resolve_checkpoint`
    (its first layer, read from disk to the torch ``device``) with
    :func:`quantoracle.verify.check_layer`; ``registry`` (default: the installed plugins) serves
    the layers. A group no backend serves records its :class:`NoBackendError`; checkpoint errors
    raise. Each layer and its weights are dropped before the next is read."""
    import torch

    from quantoracle.checkpoint_resolution import resolve_checkpoint
    from quantoracle.layers import NVFP4FusedMoE, NVFP4Linear
    from quantoracle.oracle import Device, NoBackendError
    from quantoracle.schemes.checkpoint import Checkpoint
    from quantoracle.verify import check_layer

    device = torch.device(device)
    grouped = resolve_checkpoint(directory, Device.of(device), dtype=dtype, top_k=top_k)
    result = CheckpointVerification(str(directory), str(device), dtype)
    options = dict(dtype=getattr(torch, dtype), registry=registry, verify="off")
    with Checkpoint.open(directory) as checkpoint:
        for group in grouped.groups:
            p, name = group.problem, group.names[0]
            checked = GroupVerification(group.names, p)
            try:
                if p.kind == "linear":
                    weights = checkpoint.linear(name).to(device)
                    layer = NVFP4Linear(weights, scheme=p.scheme, name=name, **options)
                else:
                    weights = checkpoint.moe(name).to(device)
                    layer = NVFP4FusedMoE(weights, top_k=p.top_k, experts=p.experts, scheme=p.scheme,
                                          activation=p.moe_activation, name=name, **options)
            except NoBackendError as err:
                checked.error = err
            else:
                checked.plan, checked.checks = layer.plan, check_layer(layer, weights)
                del layer, weights
            result.groups.append(checked)
    return result


def run(args: argparse.Namespace, registry: Any = None) -> int:
    """The command; ``registry`` is for tests (the installed plugins otherwise)."""
    import torch

    device = torch_device(args.device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = verify_checkpoint(args.path, device, dtype=args.dtype, top_k=args.top_k, registry=registry)
    if args.json:
        print(json.dumps({"quantoracle": __version__, "checkpoint": result.directory, "device": result.device,
                          "dtype": result.dtype, "compared": result.compared, "failed": len(result.failed),
                          "groups": [g.to_dict() for g in result.groups]}, indent=2))
    else:
        print(text(result))
    return 1 if result.failed else 0


def _group_name(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} alike)"


def _shape(p: Any) -> str:
    return f"n={p.n} k={p.k}" if p.kind == "linear" else f"E={p.experts} H={p.k} I={p.n} top{p.top_k}"


def text(result: CheckpointVerification) -> str:
    rows = []
    for g in result.groups:
        head = [_group_name(g.names), _shape(g.problem)]
        if g.error is not None:
            rows.append([*head, "-", "NONE", "-", "-", "-", "no backend (quantoracle resolve explains)"])
        elif not g.checks:
            rows.append([*head, "-", "reference", "-", "-", "-", "not compared: reference serves every batch size"])
        for i, c in enumerate(g.checks):
            error = f"{c.error:.2e}" if math.isfinite(c.error) else "NaN/Inf"
            rows.append([*(head if i == 0 else ["", ""]), c.tokens, c.label, error, f"{c.tolerance:.0e}",
                         f"{c.seconds:.3f}", "ok" if c.passed else "FAILED"])
    lines = [f"checkpoint {result.directory}; device {result.device}; activations {result.dtype}",
             table(["layer group", "shape", "M", "backend", "rel. error", "tolerance", "seconds", "result"], rows)]
    checks = [c for g in result.groups for c in g.checks]
    if not result.compared:
        lines.append(f"nothing was compared: every layer resolves to reference on {result.device}, the exact "
                     "reference itself (run on a GPU, --device cuda, to check its kernels)")
    else:
        failed = sum(not c.passed for c in checks)
        lines.append(f"{len(checks)} checks, {failed} failed, {sum(c.seconds for c in checks):.2f} s")
    unserved = sum(g.error is not None for g in result.groups)
    if unserved:
        lines.append(f"{unserved} group(s) have no backend: run quantoracle resolve for why")
    return "\n".join(lines)
