"""The argument parser of every ``fastrobust`` command: each usage error is ONE line naming the command's help.

argparse prints a usage block and a bare "invalid choice" list; here a bad choice suggests the closest one
(``difflib``), every error ends with where the full usage is, and values such as ``-8/255`` (a negative
fraction) are read as values, not as unknown options, so the value check can say what is wrong with them.
"""

from __future__ import annotations

import argparse
import difflib
import re
from typing import Any, NoReturn

# a value that starts with "-" and is a number: -8, -0.5, -1e-3, -8/255 (argparse itself knows -8 and -0.5 only)
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?(/(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)?$")


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``PROG: error: REASON; see PROG --help``, exit status 2).

    ``add_subparsers`` makes every sub-command's parser of the same class, so all of them behave alike.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER  # argparse reads the option strings through this name

    def add_subparsers(self, **kwargs: Any) -> Any:
        """As argparse's, remembering the sub-commands so that an unknown argument is reported by its command."""
        self._commands = super().add_subparsers(**kwargs)
        return self._commands

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        """As argparse's; arguments nobody knows are reported by the innermost command given (``fastrobust
        train: error: unrecognized arguments: ...``), whose --help lists what it takes."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._owner(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _owner(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        commands = getattr(self, "_commands", None)
        chosen = None if commands is None else commands.choices.get(getattr(parsed, commands.dest, None))
        return chosen._owner(parsed) if isinstance(chosen, CommandParser) else self

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line with where to find the usage, and exit with status 2."""
        reason = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {reason}; see {self.prog} --help\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """An invalid choice names the closest valid one (or, with none close, every valid one)."""
        if action.choices is None or value in action.choices:
            return
        choices = [str(choice) for choice in action.choices]
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose from {', '.join(choices)}"
        raise argparse.ArgumentError(action, f"invalid choice {value!r} ({hint})")

