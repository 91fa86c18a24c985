"""The ``fastrobust`` command: one sub-command module per job, each a thin layer over the Python API.

Each module in ``_COMMANDS`` defines ``register(subparsers)``, which adds its parser and
sets ``func`` (a callable taking the parsed namespace and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fastrobust import __version__
from fastrobust.cli.parsing import CommandParser
from fastrobust.errors import FastRobustError, StopRequested, is_interrupt

_COMMANDS = ("train", "eval", "data", "models", "methods", "sweep", "report", "analyze")
_PLUGIN_COMMANDS = ("train", "eval", "models", "sweep", "analyze")  # commands that take --import MODULE


def build_parser() -> argparse.ArgumentParser:
    """The ``fastrobust`` parser with every sub-command (all CommandParser: usage errors are one line)."""
    parser = CommandParser(
        prog="fastrobust",
        description="Efficient adversarial robust training and robustness evaluation of image classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"fastrobust {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}_cmd")
        except ModuleNotFoundError as error:
            if error.name == f"{__name__}.{name}_cmd":
                continue  # that command is not part of this build
            raise
        module.register(subparsers)
    for name in _PLUGIN_COMMANDS:
        if name in subparsers.choices:
            subparsers.choices[name].add_argument(
                "--import", dest="imports", action="append", default=[], metavar="MODULE",
                help="import MODULE first (from the current folder or the installed packages): a plugin that "
                     "registers models with fastrobust.models.register (repeatable; see docs/models.md)")
    return parser



def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "imports", None):
            from fastrobust.models import import_plugins  # startup

            import_plugins(args.imports)
        return int(args.func(args) or 0)
    except FastRobustError as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())  # always one line
        label = "stopped" if isinstance(error, StopRequested) else "error"  # a stop asked for is no error
        print(f"fastrobust {args.command}: {label}: {message}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine, not the input: disk full, permissions, a vanished file
        if is_interrupt(error):
            return _interrupted(args.command)
        where = f" ({error.filename})" if error.filename else ""
        hint = "; every file written so far is complete (atomic writes): fix it, then rerun" + (
            " with --resume RUN" if args.command == "train" else "")
        print(f"fastrobust {args.command}: error: {error.strerror or error}{where}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        return _interrupted(args.command, interrupt)
    except Exception as error:  # an interrupt wrapped by what it stopped (torch.compile's build): the same line
        if is_interrupt(error):
            return _interrupted(args.command)
        raise


def _interrupted(command: str, interrupt: KeyboardInterrupt | None = None) -> int:
    """The one line of a stopped command (with what to do next, when the command raised the interrupt with it as
    its message), and its exit status (130, as a shell reports Ctrl-C)."""
    detail = str(interrupt.args[0]) if interrupt is not None and interrupt.args else ""
    print(f"fastrobust {command}: interrupted" + (f"; {detail}" if detail else ""), file=sys.stderr)
    return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
