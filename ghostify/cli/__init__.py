"""The ``ghostify`` command line: convert a model by SPEC (calibrated on the user's data,
fine-tuned), report on a saved checkpoint, deploy it.

``main`` parses and checks the whole command line before importing torch (``parser``,
``checks``), so a usage error exits with status 2 at once; the work is in ``commands``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from ..errors import GhostifyError
from .checks import UsageError, check_command_line
from .parser import build_parser

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ghostify`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    command = f"{parser.prog} {args.command}"
    try:
        check_command_line(args)
        from .commands import COMMANDS, Progress  # torch: only for a command line that can work

        say = Progress(args.quiet)
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            result = COMMANDS[args.command](args, say)
    except UsageError as error:
        if args.traceback:
            raise
        print(f"{command}: error: {error} (see {command} --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ghostify: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.traceback:
            raise
        print(f"ghostify: error: {_one_line(error)}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(result)
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings as one line each, in the command line's voice (no source lines)."""
    print(f"ghostify: warning: {message}", file=sys.stderr, flush=True)


def _one_line(error: BaseException) -> str:
    """An exception as one line; ours already say what to do, others get named and a hint."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = " ".join(lines) if lines else "(no message)"
    if isinstance(error, GhostifyError):
        return text
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror or text}: {error.filename}"
    return f"{type(error).__name__}: {text} (rerun with --traceback for details)"
