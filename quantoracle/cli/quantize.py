"""``quantoracle quantize``: a 16-bit safetensors model directory -> an NVFP4 checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from quantoracle.cli.options import UsageError, add_quiet, show_progress
from quantoracle.schemes.checkpoint.writer import DEFAULT_EXCLUDE

HELP = "quantize a 16-bit safetensors model directory to NVFP4"
AMAX_EXAMPLE = '\'{"model.layers.0.self_attn.o_proj": 3.5, ...}\''


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize", help=HELP,
        description="Quantize a transformers model directory (config.json + *.safetensors, 16-bit) "
                    "into a new NVFP4 checkpoint directory, ModelOpt or compressed-tensors format. "
                    "The destination appears only when complete.")
    parser.add_argument("src", help="a transformers model directory (config.json + *.safetensors)")
    parser.add_argument("dst", help="the new checkpoint directory (must not exist, or be empty)")
    parser.add_argument("--scheme", default="w4a16_nvfp4", choices=["w4a16_nvfp4", "w4a4_nvfp4"],
                        help="w4a16_nvfp4: weights only; w4a4_nvfp4 also quantizes activations "
                             "and needs --input-amax")
    parser.add_argument("--format", default="modelopt", choices=["modelopt", "compressed-tensors"],
                        help="checkpoint format")
    parser.add_argument("--exclude", action="append", metavar="GLOB",
                        help="module-name glob kept 16-bit (repeatable), in addition to the defaults "
                             f"({', '.join(DEFAULT_EXCLUDE)})")
    parser.add_argument("--no-default-exclude", action="store_true",
                        help="quantize the modules the defaults keep 16-bit too (only --exclude is kept)")
    parser.add_argument("--input-amax", metavar="JSON", type=input_amax,
                        help="w4a4_nvfp4: each quantized module's calibrated max |input|, as a JSON "
                             f"object inline ({AMAX_EXAMPLE}) or the path of a file holding one")
    add_quiet(parser)
    parser.set_defaults(run=run)


def input_amax(text: str) -> dict[str, Any]:
    """``--input-amax``: a JSON object given inline (text starting with ``{``, or ``[`` to say
    that an array is not one) or in a file."""
    if text.lstrip().startswith(("{", "[")):
        source, document = "the inline JSON", text
    else:
        path = Path(text)
        if not path.is_file():
            raise UsageError(f"--input-amax {text!r}: no such file; pass the path of a JSON file or "
                             f"an inline JSON object such as {AMAX_EXAMPLE}")
        source, document = str(path), path.read_text()
    try:
        value = json.loads(document)
    except json.JSONDecodeError as err:
        raise UsageError(f"--input-amax: {source} is not valid JSON ({err.msg} at line {err.lineno}, "
                         f"column {err.colno}); expected an object such as {AMAX_EXAMPLE}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--input-amax: {source} holds a JSON {type(value).__name__}, not an object "
                         f"of module name -> max |input|, such as {AMAX_EXAMPLE}")
    return value


def run(args: argparse.Namespace) -> int:
    from quantoracle.schemes.checkpoint import quantize_checkpoint

    summary = quantize_checkpoint(
        args.src, args.dst, args.scheme, format=args.format, exclude=tuple(args.exclude or ()),
        default_exclude=not args.no_default_exclude, input_amax=args.input_amax, progress=show_progress(args),
    )
    print(summary.describe())
    return 0
