import argparse

import pytest

from ringtune.cli import build_parser


def subcommands(parser: argparse.ArgumentParser, prefix: str = "ringtune") -> dict[str, argparse.ArgumentParser]:
    """Every command line's parser, nested subcommands included, by what a user types."""
    found = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(subcommands(sub, f"{prefix} {name}"))
    return found


@pytest.mark.parametrize("command", sorted(subcommands(build_parser())))
def test_every_command_prints_its_help(command):
    """argparse formats help with %: a help text with a bare percent sign (a preset's measured numbers) crashed
    `ringtune train --help` with a TypeError."""
    text = subcommands(build_parser())[command].format_help()
    assert text.startswith("usage: " + command)
