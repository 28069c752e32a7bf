"""Helpers of the command-line tests: an error's one line, one flag's help."""

import re

from downpour.cli import main


def error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("downpour: error: ") and len(err.splitlines()) == 1
    return err


def flag_help(help_text: str, flag: str) -> str:
    match = re.search(rf"^  {re.escape(flag)}\b(.*?)(?=^  --|^\S|\Z)", help_text,
                      re.MULTILINE | re.DOTALL)
    assert match, f"{flag} not in --help"
    return " ".join(match[1].split())
