"""The ``quantoracle`` command line: one module per command, each with ``register(subparsers)``
(its options) and ``run(args) -> exit code``; :func:`main` builds the parser from
:data:`COMMANDS` and turns every error into one message and a documented exit code
(:data:`EXIT_CODES`, docs/cli.md)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from quantoracle._version import __version__
from quantoracle.cli import backends, bench, calibrate, demo, env, matrix, quantize, resolve, tune, verify
from quantoracle.cli.options import Parser, UsageError
from quantoracle.errors import QuantoracleError
from quantoracle.oracle import NoBackendError

COMMANDS = (demo, resolve, backends, matrix, calibrate, quantize, tune, bench, env, verify)
"""The command modules, in the order ``--help`` lists them."""

EXIT_CODES = {
    0: "success",
    1: "no backend serves a layer (resolve), or a check failed",
    2: "bad input: a usage error, a missing or malformed checkpoint, a path that cannot be\n"
       "written, a device this machine does not have",
    130: "interrupted (Ctrl-C)",
    141: "stdout closed early (e.g. piped into head); nothing more is printed",
}

DESCRIPTION = """\
quantoracle picks the kernel backend for each quantized LLM layer (NVFP4 first) and explains why
every other backend was rejected. It also runs the layers, and quantizes 16-bit checkpoints."""


def build_parser() -> Parser:
    epilog = "exit codes:\n" + "\n".join(
        f"  {code:<4} " + meaning.replace("\n", "\n       ") for code, meaning in EXIT_CODES.items())
    parser = Parser(prog="quantoracle", description=DESCRIPTION, epilog=epilog)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (see :data:`EXIT_CODES`). Errors are one message on
    stderr, or ``{"error": {"type", "message"}}`` on stdout when ``--json`` was given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    prefix = f"quantoracle {command}" if command else "quantoracle"
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help, --version
            return int(done.code or 0)
        return args.run(args)
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except (QuantoracleError, ValidationError, OSError) as err:
        code = 1 if isinstance(err, NoBackendError) else 2
        if "--json" in argv:
            print(json.dumps({"error": {"type": type(err).__name__, "message": _message(err)}}, indent=2))
        else:
            print(f"{prefix}: {_message(err)}", file=sys.stderr)
        return code


def _message(err: BaseException) -> str:
    """The error as people read it: pydantic's errors as ``field: problem`` pairs, an OSError as
    ``path: reason``."""
    if isinstance(err, ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors())
        return f"invalid {err.title}: {problems}"
    if isinstance(err, OSError) and err.strerror:
        where = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
        return f"{where}: {err.strerror}" if where else err.strerror
    return str(err)


def _silence_stdout() -> None:
    """After the reader of stdout went away: point stdout at /dev/null, so the interpreter's
    final flush does not raise a second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no real file (captured in tests): nothing to flush
        pass


__all__ = ["COMMANDS", "EXIT_CODES", "build_parser", "main"]
