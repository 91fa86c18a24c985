"""Every ``fastrobust ...`` command quoted in a shipped preset's description is one the CLI accepts: each is
parsed (never run) by the real parser, so a renamed flag cannot leave a preset advising a command that fails."""

from __future__ import annotations

import re
import shlex

import pytest

from fastrobust.cli import build_parser
from fastrobust.train.presets import preset_descriptions

# a command: "fastrobust", then words up to the end of its sentence or of the brackets/backticks/quotes it sits in
COMMAND = re.compile(r"fastrobust(?:\s+[^\s;`()'\"]+)+")


def quoted_commands(text: str) -> list[str]:
    """The ``fastrobust ...`` commands in ``text``, each without a sentence's final full stop."""
    return [match.group(0).removesuffix(".") for match in COMMAND.finditer(text)]


def all_quoted() -> list[tuple[str, str]]:
    return [(name, command) for name, text in preset_descriptions().items() for command in quoted_commands(text)]


def test_commands_are_found_where_descriptions_quote_them():
    assert quoted_commands("check it (fastrobust eval --checkpoint RUN --attack pgd20 square rays). Then") == [
        "fastrobust eval --checkpoint RUN --attack pgd20 square rays"]
    assert quoted_commands("use `fastrobust train --preset quickstart`; or fastrobust models.") == [
        "fastrobust train --preset quickstart", "fastrobust models"]
    assert any(name == "cifar10-resnet18-sprout" for name, _ in all_quoted())  # the scan sees the presets' text


@pytest.mark.parametrize("preset, command", all_quoted())
def test_every_command_in_a_preset_description_parses(preset, command, capsys):
    words = shlex.split(command)[1:]
    try:
        build_parser().parse_args(words)
    except SystemExit:
        pytest.fail(f"preset {preset} quotes {command!r}, which the CLI refuses: {capsys.readouterr().err.strip()}")
