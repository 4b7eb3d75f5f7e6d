"""What several commands share: the usage error, the help formatter, the ``--device`` readers
(a compute capability for ``resolve`` / ``matrix``, a torch device for ``demo``), the shared
options and the progress switch."""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantoracle.errors import QuantoracleError
from quantoracle.oracle import Device
from quantoracle.oracle.engine import FALLBACKS, LAYOUT_POLICIES
from quantoracle.oracle.spec import ACTIVATION_DTYPES

if TYPE_CHECKING:
    import torch

_CUDA = re.compile(r"cuda(?::(\d+))?")


class UsageError(QuantoracleError):
    """A command-line value that cannot be used: the message names the option, the value and
    what to write instead (exit code 2)."""


class HelpFormatter(argparse.HelpFormatter):
    """Plain text: descriptions and epilogs are filled paragraph by paragraph (blank lines
    separate them), indented lines are kept as written (lists); every option's help ends with
    its default, unless the default is None / False or the help already says it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.strip("\n").split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(textwrap.fill(" ".join(lines), width, initial_indent=indent,
                                                subsequent_indent=indent))
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (the sub-command parsers are of the same class) that formats help with
    :class:`HelpFormatter` and raises :class:`UsageError` instead of exiting, so ``main`` reports
    every error one way (as JSON under ``--json``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


@dataclass(frozen=True)
class DeviceChoice:
    """The device a command used and how it was chosen (both are printed)."""

    device: Device
    source: str

    def __str__(self) -> str:
        return f"{self.device} ({self.source})"


ORACLE_DEVICES = "cpu, rocm, a compute capability such as sm80, sm90, sm100, or cuda / cuda:N (this machine's GPU)"
TORCH_DEVICES = "cpu, cuda or cuda:N"


def cuda_device(text: str, option: str = "--device") -> "torch.device":
    """``cuda`` or ``cuda:N`` as a torch device of this machine; :class:`UsageError` when torch
    sees no CUDA GPU or no GPU N."""
    import torch

    match = _CUDA.fullmatch(text.strip().lower())
    if match is None:
        raise UsageError(f"{option} {text!r}: write {TORCH_DEVICES}")
    if not torch.cuda.is_available():
        raise UsageError(
            f"{option} {text}: needs a CUDA GPU, and torch {torch.__version__} sees none "
            f"(CUDA build: {torch.version.cuda or 'no'}); use --device cpu"
        )
    index = int(match.group(1) or torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise UsageError(f"{option} {text}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def torch_device(text: str | None) -> "torch.device | None":
    """``demo --device``: ``cpu``, ``cuda`` or ``cuda:N``; None lets the demo pick."""
    import torch

    if text is None:
        return None
    if text.strip().lower() == "cpu":
        return torch.device("cpu")
    return cuda_device(text)


def oracle_device(text: str | None) -> DeviceChoice:
    """``resolve`` / ``matrix --device``: ``cpu``, ``rocm``, ``sm90`` (any compute capability) or
    ``cuda`` / ``cuda:N`` (this machine's GPU, probed); None is this machine (its GPU, else the
    CPU)."""
    if text is None:
        return DeviceChoice(Device.current(), "this machine; pass --device to choose")
    if _CUDA.fullmatch(text.strip().lower()):
        import torch

        gpu = cuda_device(text)
        return DeviceChoice(Device.of(gpu), f"--device {text}: {torch.cuda.get_device_name(gpu)}")
    try:
        return DeviceChoice(Device.parse(text), f"--device {text}")
    except ValueError:
        raise UsageError(f"--device {text!r}: write {ORACLE_DEVICES}") from None


def add_json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true",
                        help=f"print {what} as JSON on stdout (errors too, as {{\"error\": {{...}}}})")


def add_oracle_options(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype`` and ``--activation-fallback`` of ``resolve`` and ``matrix``."""
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help=f"where the layers would run: {ORACLE_DEVICES} (default: this machine)")
    parser.add_argument("--dtype", default="bfloat16", choices=ACTIVATION_DTYPES,
                        help="activation dtype")
    parser.add_argument("--activation-fallback", default="weight_only", choices=FALLBACKS,
                        help="when no backend runs a W4A4 scheme's activations natively: serve it "
                             "weight-only, emulate W4A4 exactly, or report an error")
    parser.add_argument("--layouts", default="one", choices=LAYOUT_POLICIES,
                        help="weight copies a layer may hold: one layout (the fastest plan that fits), or "
                             "the fastest candidate per batch size whatever its layout")
    parser.add_argument("--tuning", default=None, metavar="PATH",
                        help="tuning cache to rank by ('none': no measurements; default: $QUANTORACLE_TUNING, "
                             "the user cache, then the shipped ones)")
    parser.add_argument("--quarantine", default=None, metavar="PATH",
                        help="quarantine file, JSON or TOML (default: $QUANTORACLE_QUARANTINE), on top of the "
                             "shipped entries")
    parser.add_argument("--allow-quarantined", action="store_true",
                        help="ignore every quarantine entry (you take responsibility for known-bad kernels)")


def oracle_options(args: argparse.Namespace) -> dict:
    """The planning options of :func:`add_oracle_options` as keyword arguments."""
    return dict(activation_fallback=args.activation_fallback, layouts=args.layouts, tuning=args.tuning,
                quarantine=args.quarantine, allow_quarantined=args.allow_quarantined)


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (there is none anyway when stderr is not a terminal)")


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars go to stderr, and only to a terminal, unless ``--quiet``."""
    return not args.quiet and sys.stderr.isatty()


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value
