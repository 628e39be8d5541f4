"""The `flashsae` command line: every subcommand is registered, and user errors end in one line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from flashsae.sae import cli

SUBCOMMANDS = ("train", "rank", "eval", "export", "import")


def test_every_subcommand_is_registered_with_help():
    parser = cli.build_parser()
    help_text = parser.format_help()
    for name in SUBCOMMANDS:
        assert name in help_text
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0


def test_a_value_error_becomes_one_line_and_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"
    code = cli.main(["export", "--format", "saelens", str(missing), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("flashsae export: error:") and str(missing) in err
    assert "\n" not in err


def test_python_dash_m_runs_the_same_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "flashsae", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for name in SUBCOMMANDS:
        assert name in done.stdout
