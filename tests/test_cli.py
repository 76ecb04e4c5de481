"""The `velo` command line: every option of every command says what it does."""

from __future__ import annotations

import argparse

from velo_cli.main import build_parser


def test_every_option_of_every_command_has_help() -> None:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [f"velo {name} {'/'.join(action.option_strings) or action.dest}"
               for name, sub in commands.choices.items() for action in sub._actions
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert missing == []
    # One word, one meaning: --edges is a list of addresses, --edges-count a number.
    edges = {name: next(a for a in sub._actions if "--edges" in a.option_strings)
             for name, sub in commands.choices.items()
             if any("--edges" in a.option_strings for a in sub._actions)}
    assert set(edges) == {"replay"} and edges["replay"].type is None
