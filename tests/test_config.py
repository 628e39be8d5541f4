"""The training options, declared once: --help, validation and the resume rules all follow the declarations."""
from __future__ import annotations

import dataclasses
import re

import pytest

from flashsae.errors import ConfigError
from flashsae.sae import cli
from flashsae.sae.run.command import config_from_args
from flashsae.sae.run.config import FIELDS, RESUMABLE, TrainConfig, declaration, flag, merge_resumed_config

NAMES = [f.name for f in FIELDS]
VALIDATED = [f.name for f in FIELDS if declaration(f).choices is not None or declaration(f).check is not None]

# A value each validated option rejects, as command-line words (each passes argparse's type conversion).
BAD_VALUES = {
    "site": ["mlp_hidden"], "layer": ["-1"], "n_tokens": ["0"], "seq_len": ["0"], "n_features": ["0"],
    "k": ["5000"], "batch_size": ["0"], "epochs": ["0"], "lr": ["0"], "dtype": ["float64"], "device": ["gpu"],
    "backend": ["cuda"], "seed": ["-1"], "init": ["pca"], "d_init": ["1.5"], "asi_tokens": ["0"], "aux_k": ["-1"],
    "aux_coef": ["-0.5"], "dead_window": ["0"], "normalize": ["layer-norm"], "optimizer": ["sgd"],
    "log_every": ["0"], "checkpoint_every": ["-1"], "log": ["jsonl", "csv"], "parallel": ["pipeline"],
    "k_start": ["5000"], "k_anneal_steps": ["-1"], "init_scale": ["huge"],
    "lr_warmup_steps": ["-1"], "lr_decay": ["step"], "lr_decay_steps": ["0"], "lr_final_fraction": ["1.5"],
    "target_site": ["mlp_hidden"], "activation": ["jumprelu"], "threshold_lr": ["1.5"], "matryoshka": ["0"],
    "overwrite": ["--resume", "runs/elsewhere"],
}

# A valid value other than the default for every option.
CHANGED = {
    "out": "runs/other", "model": "gpt2", "revision": "main", "site": "mlp_out", "layer": 2, "hook": "h.1.mlp",
    "text": "texts.jsonl", "n_tokens": 1000, "seq_len": 64, "store": "store", "cache": "cache", "n_features": 512,
    "k": 8, "batch_size": 256, "epochs": 2, "lr": 1e-3, "dtype": "bfloat16", "device": "cpu", "backend": "torch",
    "seed": 3, "init": "asi", "d_init": 0.25, "asi_center": False, "asi_tokens": 4096, "aux_k": 16, "aux_coef": 0.1,
    "dead_window": 5000, "normalize": "none", "optimizer": "adam", "log_every": 10, "checkpoint_every": 0,
    "resume": "runs/demo", "log": ["jsonl", "wandb"], "parallel": "data", "progress": False,
    "k_start": 64, "k_anneal_steps": 100, "init_scale": "calibrate", "track_subspace": True, "overwrite": True,
    "lr_warmup_steps": 100, "lr_decay": "cosine", "lr_decay_steps": 500, "lr_final_fraction": 0.0,
    "target_site": "mlp_out", "target_hook": "h.1.mlp", "activation": "batchtopk", "threshold_lr": 0.1,
    "matryoshka": [256, 1024], "skip_connection": True,
}


def entry_start(text: str, name: str) -> int:
    """Where the --help entry of option ``name`` starts in ``text`` (-1 if it has none)."""
    found = re.search(rf"^  {flag(name)}[ ,\n]", text, re.MULTILINE)
    return found.start() if found else -1


def option_entries(help_text: str) -> dict[str, str]:
    """{field name: its whole --help entry, whitespace collapsed}."""
    starts = sorted((entry_start(help_text, name), name) for name in NAMES)
    assert all(start >= 0 for start, _ in starts), [name for start, name in starts if start < 0]
    ends = [start for start, _ in starts[1:]] + [len(help_text)]
    return {name: " ".join(help_text[start:end].split()) for (start, name), end in zip(starts, ends)}


def expected_default(f: dataclasses.Field) -> str:
    text = declaration(f).default_text
    if text is not None:
        return text
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(value) if isinstance(value, list) else str(value)


def train_help(capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside a default
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def run_train(argv: list[str], capsys) -> tuple[int, list[str]]:
    try:
        code = cli.main(["train", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


# ---------------------------------------------------------------------------------------------
# --help


def test_every_option_is_in_train_help_with_its_default(capsys, monkeypatch):
    entries = option_entries(train_help(capsys, monkeypatch))
    for f in FIELDS:
        if f.default is None:
            assert declaration(f).default_text, f"{f.name}: a None default needs words for --help"
        assert f"(default: {expected_default(f)})" in entries[f.name], entries[f.name]
        if isinstance(f.default, bool):
            assert f"--no-{flag(f.name)[2:]}" in entries[f.name]


def test_help_lists_each_options_choices_in_its_declared_group(capsys, monkeypatch):
    help_text = train_help(capsys, monkeypatch)
    entries = option_entries(help_text)
    for f in FIELDS:
        choices = declaration(f).choices
        if choices is not None:
            assert ", ".join(choices) in entries[f.name]
        group = help_text.split(f"\n{declaration(f).group}:\n", 1)[1].split("\n\n", 1)[0]
        assert entry_start(group, f.name) >= 0, f"{f.name} is not in {declaration(f).group!r}"


# ---------------------------------------------------------------------------------------------
# Validation


def test_the_defaults_are_valid():
    TrainConfig().validate()


def test_every_validated_option_has_a_bad_value_here():
    assert sorted(BAD_VALUES) == sorted(VALIDATED)


@pytest.mark.parametrize("name", VALIDATED)
def test_a_bad_value_is_one_line_naming_the_option(name, capsys, tmp_path):
    out = tmp_path / "run"
    code, err = run_train(["--out", str(out), flag(name), *BAD_VALUES[name]], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("flashsae train: error: ") and flag(name) in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("model", 5, "must be a string"), ("hook", 0, "must be a string"), ("progress", "yes", "must be a boolean"),
        ("log", "wandb", "must be a list"), ("n_features", 2.0, "must be an integer"), ("seed", True, "integer"),
        ("lr", float("nan"), "finite number > 0"), ("d_init", True, "count"), ("k", "8", "must be an int"),
    ],
)
def test_python_configs_of_the_wrong_type_name_the_option(name, value, message):
    with pytest.raises(ConfigError, match=re.escape(flag(name)) + ".*" + message):
        TrainConfig(**{name: value}).validate()


def test_device_is_auto_or_a_torch_device():
    for device in ("auto", "cpu", "cuda", "cuda:1"):  # whether CUDA is there is the run's to find out
        TrainConfig(device=device).validate()
    with pytest.raises(ConfigError, match="--device must be a torch device such as cpu, cuda or cuda:1, got 'cuda:x'"):
        TrainConfig(device="cuda:x").validate()


def test_k_is_checked_against_n_features():
    TrainConfig(n_features=64, k=64).validate()
    TrainConfig(n_features=2048, k=600, aux_k=1000).validate()  # no cap on k or the AuxK k
    with pytest.raises(ConfigError, match=r"--k must be in \[1, --n-features=64\], got --k=65"):
        TrainConfig(n_features=64, k=65).validate()


def test_d_init_takes_a_count_or_a_fraction():
    parser = cli.build_parser()
    count = config_from_args(parser.parse_args(["train", "--d-init", "96"])).d_init
    assert count == 96 and isinstance(count, int)
    assert config_from_args(parser.parse_args(["train", "--d-init", "0.25"])).d_init == 0.25


# ---------------------------------------------------------------------------------------------
# Options given, and --resume


def test_only_the_options_given_reach_the_config():
    args = cli.build_parser().parse_args(["train", "--k", "8", "--no-progress", "--log", "wandb"])
    given = {name for name in NAMES if hasattr(args, name)}
    assert given == {"k", "progress", "log"}
    cfg = config_from_args(args)
    assert (cfg.k, cfg.progress, cfg.log) == (8, False, ["wandb"])
    assert cfg.n_features == TrainConfig().n_features


def test_every_option_has_a_changed_value_here():
    assert sorted(CHANGED) == sorted(NAMES)
    for name, value in CHANGED.items():
        assert value != getattr(TrainConfig(), name), name
        TrainConfig(**{name: value}).validate()


def test_the_resumable_options_are_the_run_bookkeeping_ones():
    assert RESUMABLE == {"out", "resume", "progress", "log_every", "log", "checkpoint_every", "cache", "device",
                         "track_subspace", "overwrite"}


@pytest.mark.parametrize("name", NAMES)
def test_resume_accepts_a_change_only_where_declared(name):
    saved = TrainConfig().to_dict()
    if declaration(next(f for f in FIELDS if f.name == name)).resumable:
        merged = merge_resumed_config(saved, {name: CHANGED[name]})
        assert getattr(merged, name) == CHANGED[name]
    else:
        with pytest.raises(ConfigError, match=f"^{re.escape(flag(name))} .* differs from the checkpoint's {name}="):
            merge_resumed_config(saved, {name: CHANGED[name]})
        assert merge_resumed_config(saved, {name: saved[name]}) == TrainConfig(**saved)


def test_resume_without_a_checkpoint_is_one_line_naming_resume(tmp_path, capsys):
    code, err = run_train(["--resume", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("flashsae train: error: --resume: no training checkpoints") and str(tmp_path) in err[0]


# ---------------------------------------------------------------------------------------------
# Inputs checked before any work


def test_a_missing_store_is_one_line_naming_store(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_train(["--store", str(tmp_path / "nothing"), "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("flashsae train: error: --store: ") and "manifest.json is missing" in err[0]
    assert not out.exists()
