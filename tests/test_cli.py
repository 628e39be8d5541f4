"""The `flashsae` command line: every subcommand is registered, user errors end in one line, bugs keep a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from flashsae.errors import ConfigError, InputError, reraise_as
from flashsae.sae import cli
from flashsae.sae.interop import cli as interop_cli
from flashsae.sae.model import TopKSAE

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


def broken_exporter(error: Exception):
    def export(sae, out):
        raise error
    return export


@pytest.mark.parametrize("error", [TypeError("internal"), ValueError("internal"), FileNotFoundError("internal")])
def test_an_internal_error_propagates_with_its_traceback(error, tmp_path, monkeypatch, capsys):
    checkpoint = TopKSAE(8, 16, 2).save(tmp_path / "sae")
    monkeypatch.setitem(interop_cli._EXPORTERS, "saelens", broken_exporter(error))
    with pytest.raises(type(error), match="internal"):
        cli.main(["export", "--format", "saelens", str(checkpoint), str(tmp_path / "out")])
    assert capsys.readouterr().err == ""


def test_a_user_error_from_a_command_is_one_line(tmp_path, monkeypatch, capsys):
    checkpoint = TopKSAE(8, 16, 2).save(tmp_path / "sae")
    monkeypatch.setitem(interop_cli._EXPORTERS, "saelens", broken_exporter(ConfigError("--format: not today")))
    assert cli.main(["export", "--format", "saelens", str(checkpoint), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "flashsae export: error: --format: not today\n"


def test_a_type_error_in_a_command_exits_with_a_traceback(tmp_path):
    checkpoint = TopKSAE(8, 16, 2).save(tmp_path / "sae")
    script = (
        "import sys\n"
        "from flashsae.sae import cli\n"
        "from flashsae.sae.interop import cli as interop_cli\n"
        "def export(sae, out):\n"
        "    raise TypeError('an internal bug')\n"
        "interop_cli._EXPORTERS['saelens'] = export\n"
        f"sys.exit(cli.main(['export', '--format', 'saelens', {str(checkpoint)!r}, {str(tmp_path / 'out')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "TypeError: an internal bug" in done.stderr
    assert "flashsae export: error" not in done.stderr


def test_reraise_as_names_the_culprit_and_leaves_other_errors_alone():
    with pytest.raises(InputError, match="^--store: gone$") as info:
        with reraise_as(InputError, FileNotFoundError, culprit="--store"):
            raise FileNotFoundError("gone")
    assert isinstance(info.value, ValueError) and isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(ConfigError, match="^--k: too big$"):  # a user error keeps its own kind and message
        with reraise_as(InputError, ValueError, culprit="--store"):
            raise ConfigError("--k: too big")
    with pytest.raises(KeyError):
        with reraise_as(InputError, ValueError):
            raise KeyError("not one of the causes")


def test_python_dash_m_runs_the_same_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "flashsae", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for name in SUBCOMMANDS:
        assert name in done.stdout
