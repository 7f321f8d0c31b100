"""The command line as a user first meets it: every command's --help prints and exits 0."""

from __future__ import annotations

import pytest

from catdog.cli import COMMANDS, DATA_COMMANDS, build_parser

EVERY_COMMAND = [[name] for name in COMMANDS] + [["data", name] for name in DATA_COMMANDS]


@pytest.mark.parametrize("words", EVERY_COMMAND, ids=" ".join)
def test_every_command_prints_its_help(words, capsys):
    # A help text with a bare "%" (e.g. "99%") made argparse fail on --help for predict and serve.
    with pytest.raises(SystemExit) as exit_info:
        build_parser(words + ["--help"]).parse_args(words + ["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: catdog " + " ".join(words))
    assert "--help" in printed
