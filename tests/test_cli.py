"""The ``bdh-mlx`` dispatcher and what every command's --help promises."""

import importlib
import subprocess
import sys

import pytest

from bdh_mlx import __version__, cli


def bdh_mlx(*argv):
    return subprocess.run([sys.executable, "-m", "bdh_mlx", *argv], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    done = bdh_mlx("--help")
    assert done.returncode == 0 and done.stderr == ""
    for name, (_, help) in cli.COMMANDS.items():
        assert f"  {name:<10} {help}" in done.stdout


def test_version():
    done = bdh_mlx("--version")
    assert (done.returncode, done.stdout) == (0, f"bdh-mlx {__version__}\n")


@pytest.mark.parametrize(("argv", "code", "err"), [
    (["fly"], 2, "bdh-mlx: error: unknown command 'fly'; choose from "),
    ([], 2, "usage: bdh-mlx <command> [options]"),
])
def test_unknown_or_missing_command(argv, code, err):
    done = bdh_mlx(*argv)
    assert done.returncode == code and done.stderr.startswith(err) and done.stdout == ""


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_option_has_help(name):
    parser = importlib.import_module(cli.COMMANDS[name][0]).build_parser()
    undocumented = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert undocumented == []
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            assert f"{action.default}" in text, (action.option_strings, action.default)
