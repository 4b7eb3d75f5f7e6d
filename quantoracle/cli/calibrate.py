"""``quantoracle calibrate``: the calibrated max |input| of every quantizable module of a 16-bit
transformers model, as the JSON file ``quantoracle quantize --input-amax`` reads (W4A4)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from quantoracle.cli.options import TORCH_DEVICES, UsageError, add_json, add_quiet, positive_int, show_progress, torch_device

HELP = "record each module's max |input| on calibration tokens (for quantize --input-amax)"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate", help=HELP,
        description="Load a 16-bit transformers model directory, run it on calibration tokens and write "
                    "the max |input| of every quantizable module (per expert and projection for MoE "
                    "experts), keyed by the checkpoint's module names: the --input-amax file of "
                    "`quantoracle quantize SRC DST --scheme w4a4_nvfp4`. Needs the transformers extra.")
    parser.add_argument("model", help="a 16-bit model directory (config.json and safetensors)")
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the JSON object")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="FILE",
                        help="a UTF-8 text file, tokenized with the model directory's tokenizer")
    source.add_argument("--input-ids", metavar="FILE",
                        help="a JSON file holding token ids: a list of ints, or a list of such lists (batches)")
    source.add_argument("--random-tokens", type=positive_int, metavar="N",
                        help="N random token ids (a smoke test of the pipeline, not a calibration "
                             "that represents real inputs)")
    parser.add_argument("--batch-tokens", type=positive_int, default=512, metavar="T",
                        help="tokens per forward pass for --text and --random-tokens")
    parser.add_argument("--device", default=None,
                        help=f"torch device to run on: {TORCH_DEVICES} (default: cuda if present, else cpu)")
    add_quiet(parser)
    add_json(parser, "a summary")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UsageError("calibrate needs transformers: pip install 'quantoracle[transformers]'") from None
    from quantoracle.integrations.transformers import calibrate

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir}: no config.json; give a transformers model directory "
                         "(quantoracle does not download hub ids: `hf download ID --local-dir DIR`)")
    device = torch_device(args.device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    batches = [b.to(device) for b in _batches(args, model_dir, model.config.vocab_size)]
    with torch.no_grad():
        result = calibrate(model, batches, progress=show_progress(args) and not args.json)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result.checkpoint, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)
    tokens = sum(b.numel() for b in batches)
    if args.json:
        print(json.dumps({"out": str(out), "modules": len(result.checkpoint), "tokens": tokens, "device": str(device)}))
    else:
        print(f"wrote the max |input| of {len(result.checkpoint)} modules ({tokens} tokens on {device}) to {out}; "
              f"next: quantoracle quantize {model_dir} OUT_DIR --scheme w4a4_nvfp4 --input-amax {out}")
    return 0


def _batches(args: argparse.Namespace, model_dir: Path, vocab: int) -> list:
    import torch

    if args.input_ids:
        try:
            ids = json.loads(Path(args.input_ids).read_text())
        except (OSError, ValueError) as err:
            raise UsageError(f"--input-ids {args.input_ids}: {err}") from None
        rows = ids if ids and isinstance(ids[0], list) else [ids]
        if not rows or not all(isinstance(i, int) and 0 <= i < vocab for row in rows for i in row):
            raise UsageError(f"--input-ids {args.input_ids}: expected token ids in 0..{vocab - 1}, a list or a list of lists")
        return [torch.tensor([row]) for row in rows if row]
    if args.text:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as err:
            raise UsageError(f"--text: {model_dir} has no usable tokenizer ({err}); pass --input-ids instead") from None
        ids = tokenizer(Path(args.text).read_text(), return_tensors="pt").input_ids[0]
    else:
        ids = torch.randint(0, vocab, (args.random_tokens,), generator=torch.Generator().manual_seed(0))
    return [ids[i:i + args.batch_tokens].unsqueeze(0) for i in range(0, ids.numel(), args.batch_tokens)]
