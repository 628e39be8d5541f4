"""Every training option, declared once: the fields of `TrainConfig`.

Each field's `option(...)` holds its default, help, argparse group, allowed values and checks, and
whether a resumed run may change it. `TrainConfig.validate`, `RESUMABLE`, `merge_resumed_config`
and the ``flashsae train`` parser (`flashsae.sae.run.command`) are all read from these declarations.

This is a small derivation rather than simple-parsing, tyro or jsonargparse because those fill every
option with its default, so ``--resume`` could no longer tell an option the user gave from one left
alone, and simple-parsing groups options only by nesting dataclasses, which would break the flat
``TrainConfig(**kwargs)``.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...checks import (
    DTYPES, parse_device, parse_dtype, require_choice, require_count_or_fraction, require_int, require_k,
    require_number,
)
from ...errors import ConfigError
from ...kernels.registry import backend_names
from ..hf import DEFAULT_TEXT, EMBEDDED_MODEL, SITES
from ..hf.texts import STDLIB_TEXT
from ..architecture import ACTIVATIONS as ACTIVATION_CHOICES
from ..architecture import DEFAULT_THRESHOLD_LR, Architecture
from ..schedules import LR_DECAYS
from ..trainer import DEFAULT_DEAD_WINDOW

# --dtype: "auto" (see `resolve_dtype`) or a parameter dtype.
DTYPE_CHOICES = ("auto", *DTYPES)

# The argparse groups of `flashsae train --help`, in the order it lists them.
ACTIVATIONS = "activations"
SAE = "SAE and optimization"
VARIANTS = "SAE variants"
INIT = "initialization and dead features"
RUNS = "output and runs"
GROUPS = (ACTIVATIONS, SAE, VARIANTS, INIT, RUNS)

_OPTION = "flashsae.option"  # the dataclass field metadata key of an `Option`

# A check beyond the allowed values: (flag, value, the whole config) -> raises ValueError/TypeError.
Check = Callable[[str, Any, "TrainConfig"], object]


@dataclass(frozen=True)
class Option:
    """How one `TrainConfig` field appears on the command line, and which values it takes.

    The field itself gives the name, type and default; None is always allowed where it is the default.
    """

    group: str
    help: str
    choices: tuple[str, ...] | None = None  # the allowed values (of each element, for a list)
    check: Check | None = None
    resumable: bool = False  # may differ from the checkpoint's value when the run is resumed
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # the argparse type, where the annotation's type is not the parser
    default_text: str | None = None  # the default as --help says it, where the value alone would not tell


def option(default: Any, group: str, help: str, **declaration: Any) -> Any:
    """A `TrainConfig` field with its `Option` (keyword arguments: the Option's other fields)."""
    metadata = {_OPTION: Option(group, help, **declaration)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """The command-line spelling of field ``name``: ``n_features`` -> ``--n-features``."""
    return "--" + name.replace("_", "-")


def count_or_fraction(text: str) -> float:
    """Parse ``--d-init``: '96' -> 96 (a count), '0.25' -> 0.25 (a fraction); ValueError otherwise."""
    value = float(text)
    return int(value) if value >= 1 and value == int(value) else value


# The default AuxK k is d/2, at most this many (Gao et al. 2024 use 512).
DEFAULT_AUX_K_MAX = 512


def default_aux_k(d_model: int) -> int:
    """The AuxK k when --aux-k is not given: d/2, at most DEFAULT_AUX_K_MAX."""
    return min(d_model // 2, DEFAULT_AUX_K_MAX)


def resolve_dtype(name: str, device: torch.device, optimizer: str) -> torch.dtype:
    """The SAE parameter dtype ``--dtype name`` means on ``device`` with ``--optimizer optimizer``.

    "auto": bfloat16 on CUDA with sparse-adam, whose bf16 parameters keep exact fp32 master weights
    (tensor-core GEMMs, half the bytes per gathered row, no update lost to rounding); float32 on
    the CPU (no bf16 speed-up there) and with torch's Adam (which would round every update to bf16).
    """
    if name != "auto":
        return parse_dtype(name, arg=flag("dtype"))
    return torch.bfloat16 if device.type == "cuda" and optimizer == "sparse-adam" else torch.float32


def default_lr(n_features: int) -> float:
    """Gao et al. (2024)'s scaling: ``2e-4 / sqrt(n_features / 2**14)`` (4e-4 for 4096 features)."""
    return 2e-4 / math.sqrt(n_features / 2**14)


def _integer(low: int, high: int | None = None) -> Check:
    return lambda name, value, cfg: require_int(name, value, low, high)


def _number(low: float = 0.0, *, strict: bool = False) -> Check:
    return lambda name, value, cfg: require_number(name, value, low, strict=strict)


def _fraction(name: str, value: Any, cfg: TrainConfig) -> None:
    require_number(name, value, 0.0)
    if value > 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _rate(name: str, value: Any, cfg: TrainConfig) -> None:
    require_number(name, value, 0.0, strict=True)
    if value > 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def _width(name: str, value: Any, cfg: TrainConfig) -> None:
    require_int(name, value, 1, cfg.n_features)


def _k(name: str, value: Any, cfg: TrainConfig) -> None:
    require_k(value, cfg.n_features, name=name, features_name=flag("n_features"))


def _device(name: str, value: Any, cfg: TrainConfig) -> None:
    if value != "auto":
        parse_device(name, value)


def _d_init(name: str, value: Any, cfg: TrainConfig) -> None:
    require_count_or_fraction(name, value)


def overwrite_conflict(name: str = "--overwrite") -> str:
    """Why --overwrite and --resume cannot be given together."""
    return f"{name} starts the run in --out afresh, --resume continues it: give one of them"


def _overwrite(name: str, value: Any, cfg: TrainConfig) -> None:
    if value and cfg.resume is not None:
        raise ValueError(overwrite_conflict(name))


@dataclass
class TrainConfig:
    """Everything that defines a run; the defaults train the embedded demo (MiniLM layer 3 attn_out)."""

    out: str = option("runs/demo", RUNS, "run directory; with --resume, the resumed run's", metavar="DIR",
                      resumable=True)
    model: str = option(EMBEDDED_MODEL, ACTIVATIONS, "Hugging Face model name or directory",
                        default_text=f"the embedded {EMBEDDED_MODEL}")
    revision: str | None = option(None, ACTIVATIONS, "model revision (branch, tag or commit)", default_text="none")
    site: str = option("attn_out", ACTIVATIONS, "where in each layer the activations are read", choices=SITES)
    layer: int = option(3, ACTIVATIONS, "layer index", check=_integer(0))
    hook: str | None = option(None, ACTIVATIONS, "hook this module path instead of --site/--layer",
                              metavar="MODULE.PATH", default_text="none")
    text: str | None = option(None, ACTIVATIONS, f"text source: {STDLIB_TEXT} (the standard library's docstrings "
                              "and comments, ~1M tokens), a local file (blank-line separated paragraphs, or .jsonl "
                              "with a 'text' field) or a Hugging Face dataset name",
                              default_text=f"Python's {DEFAULT_TEXT}")
    n_tokens: int | None = option(None, ACTIVATIONS, "tokens to collect", metavar="N", check=_integer(1),
                                  default_text="the whole text")
    seq_len: int = option(128, ACTIVATIONS, "tokens per sequence", check=_integer(1))
    target_site: str | None = option(None, ACTIVATIONS, "train a transcoder: encode --site (or --hook), reconstruct "
                                     "this site of --layer (e.g. --site mlp_in --target-site mlp_out: the MLP)",
                                     choices=SITES, default_text="none (an autoencoder)")
    target_hook: str | None = option(None, ACTIVATIONS, "train a transcoder whose target is this module path's output "
                                     "(its input with the suffix :input)", metavar="MODULE.PATH",
                                     default_text="none")
    store: str | None = option(None, ACTIVATIONS, "train on this existing activation store without loading a model",
                               metavar="DIR", default_text="none")
    cache: str | None = option(None, ACTIVATIONS, "activation store to reuse or fill; rejected when it holds another "
                               "model/site/layer/text", metavar="DIR", resumable=True, default_text="OUT/activations")
    n_features: int = option(4096, SAE, "dictionary size", metavar="F", check=_integer(1))
    k: int = option(32, SAE, "active features per token", check=_k)
    batch_size: int = option(1024, SAE, "tokens per step, over all ranks", metavar="TOKENS", check=_integer(1))
    epochs: int = option(8, SAE, "passes over the stored activations", check=_integer(1))
    lr: float | None = option(None, SAE, "learning rate", check=_number(strict=True),
                              default_text="2e-4 / sqrt(n_features / 2^14), Gao et al. 2024")
    lr_warmup_steps: int = option(0, SAE, "warm the learning rate up linearly over the first STEPS steps "
                                  "(step s runs at (s + 1) / STEPS of it)", metavar="STEPS", check=_integer(0))
    lr_decay: str = option("none", SAE, "decay the learning rate over the last --lr-decay-steps steps to "
                           "--lr-final-fraction of it, linearly or along a half cosine", choices=LR_DECAYS)
    lr_decay_steps: int | None = option(None, SAE, "steps the decay takes, ending at the last step",
                                        metavar="STEPS", check=_integer(1),
                                        default_text="every step after the warm-up")
    lr_final_fraction: float = option(0.1, SAE, "the decayed learning rate's fraction of --lr at the last step",
                                      metavar="FRACTION", check=_fraction)
    dtype: str = option("auto", SAE, "SAE parameter dtype; auto is bfloat16 mixed precision on CUDA with sparse-adam "
                        "(bf16 weights and tensor-core GEMMs, fp32 accumulation and gradients, exact fp32 master "
                        "weights in the optimizer) and float32 otherwise", choices=DTYPE_CHOICES)
    device: str = option("auto", SAE, "cpu, cuda or cuda:N; auto is cuda when available, else cpu", check=_device,
                         resumable=True)
    backend: str = option("auto", SAE, "kernels", choices=backend_names())
    seed: int = option(0, SAE, "seed for the initialization and the batch order", check=_integer(0))
    k_start: int | None = option(None, SAE, "anneal k linearly from K_START down to --k over --k-anneal-steps "
                                 "steps (sparsify's k decay; a high initial L0)", metavar="K_START", check=_k,
                                 default_text="--k (no annealing)")
    k_anneal_steps: int = option(0, SAE, "steps over which k falls from --k-start to --k", metavar="STEPS",
                                 check=_integer(0))
    activation: str = option("topk", VARIANTS, "topk: k features per token; batchtopk: the batch's batch-size * k "
                             "largest pre-activations in training (k per token on average), saved with a JumpReLU "
                             "threshold that encodes without a batch (Bussmann et al. 2024)", choices=ACTIVATION_CHOICES)
    threshold_lr: float = option(DEFAULT_THRESHOLD_LR, VARIANTS, "batchtopk: the rate of the threshold's moving "
                                 "average of each batch's smallest selected activation", check=_rate)
    matryoshka: list[int] | None = option(None, VARIANTS, "nested dictionaries: the reconstructions from the first "
                                          "M_1 < M_2 < ... features each add their loss; --n-features is the last "
                                          "level", metavar="M", check=_width, default_text="none")
    skip_connection: bool = option(False, VARIANTS, "a transcoder also learns a linear skip map of its input "
                                   "(a skip transcoder)")
    init: str = option("random", INIT, "asi is Active Subspace Initialization: the decoder starts in the top "
                       "--d-init singular directions of the run's activations", choices=("random", "asi"))
    init_scale: str = option("unit", INIT, "unit: encoder rows start equal to the unit-norm decoder rows; calibrate: "
                             "then scaled by the one factor that minimizes the initial reconstruction error of the "
                             "--asi-tokens tokens (the selection does not change)", choices=("unit", "calibrate"))
    track_subspace: bool = option(False, INIT, "log subspace_energy, the mean fraction of each decoder row's energy "
                                  "inside the top --d-init directions of the activations (always on with --init "
                                  "asi)", resumable=True)
    d_init: float = option(0.5, INIT, "ASI subspace dimension: a count, or a fraction of d", metavar="N|FRACTION",
                           parse=count_or_fraction, check=_d_init)
    asi_center: bool = option(True, INIT, "subtract the activations' mean before the SVD, so the subspace spans "
                              "their variation rather than their offset, which b_dec learns")
    asi_tokens: int = option(16384, INIT, "the run's first TOKENS tokens give the initial b_dec (their mean) and "
                             "the ASI subspace", metavar="TOKENS", check=_integer(1))
    aux_k: int | None = option(None, INIT, "AuxK: dead features that reconstruct the residual (Gao et al. 2024); "
                               "0 disables", metavar="N", check=_integer(0),
                               default_text=f"d/2, at most {DEFAULT_AUX_K_MAX}")
    aux_coef: float = option(1 / 32, INIT, "AuxK loss coefficient", check=_number())
    dead_window: int | None = option(None, INIT, "a feature is dead after this many tokens without firing",
                                     metavar="TOKENS", check=_integer(1),
                                     default_text=f"{DEFAULT_DEAD_WINDOW:,} or one epoch, whichever is shorter")
    normalize: str = option("mean-sq-norm", SAE, "mean-sq-norm scales the activations so that their mean squared "
                            "norm is d (the scale is saved as metadata norm_scale)", choices=("mean-sq-norm", "none"))
    optimizer: str = option("sparse-adam", SAE, "sparse-adam: row-sparse Adam on sparse gradients; adam: dense "
                            "torch Adam", choices=("sparse-adam", "adam"))
    log_every: int = option(50, RUNS, "steps between metric lines", metavar="STEPS", check=_integer(1), resumable=True)
    checkpoint_every: int = option(500, RUNS, "steps between full training-state checkpoints; 0 disables",
                                   metavar="STEPS", check=_integer(0), resumable=True)
    resume: str | None = option(None, RUNS, "continue the run in DIR from its newest intact checkpoint",
                                metavar="DIR", resumable=True, default_text="a new run")
    overwrite: bool = option(False, RUNS, "replace the run already in --out: its checkpoints, metrics and results "
                             "are deleted, its activation cache is reused when it fits (else collected again); "
                             "files that are no run's are never deleted", check=_overwrite, resumable=True)
    log: list[str] = option(["jsonl"], RUNS, "metric sinks (OUT/metrics.jsonl is always written)",
                            choices=("jsonl", "tensorboard", "wandb"), resumable=True)
    parallel: str = option("auto", RUNS, "auto is data under torchrun, else none",
                           choices=("auto", "none", "data", "feature"))
    progress: bool = option(True, RUNS, "show a progress bar", resumable=True)

    def validate(self) -> None:
        """Raise ConfigError naming the option (as its command-line flag) for the first bad value."""
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name), self)
        if self.k_start is not None and self.k_start < self.k:
            raise ConfigError(f"{flag('k_start')} must be >= {flag('k')}={self.k}, got {self.k_start}")
        widths = self.matryoshka or []
        if widths != sorted(set(widths)):
            raise ConfigError(f"{flag('matryoshka')} widths must rise strictly, got {' '.join(map(str, widths))}")
        if self.target_site is not None and self.target_hook is not None:
            raise ConfigError(f"{flag('target_site')} and {flag('target_hook')} both name the transcoder's target: "
                              "give one of them")

    @property
    def transcodes(self) -> bool:
        """Whether the options ask for a transcoder (a --store may also hold a transcoder's pairs)."""
        return self.target_site is not None or self.target_hook is not None

    def architecture(self, transcoder: bool, d_out: int | None) -> Architecture:
        """The SAE variant these options train; ``transcoder`` and ``d_out`` come from the activations."""
        widths = list(self.matryoshka or [])
        if widths and widths[-1] != self.n_features:
            widths.append(self.n_features)
        return Architecture(activation=self.activation, matryoshka_widths=tuple(widths), transcoder=transcoder,
                            d_out=d_out, skip_connection=self.skip_connection, threshold_lr=self.threshold_lr)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def declaration(f: dataclasses.Field) -> Option:
    """The `Option` declared for `TrainConfig` field ``f``."""
    return f.metadata[_OPTION]


def value_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(the type of one value, whether the option takes a list of them), from ``f``'s annotation."""
    hint = _HINTS[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and typing.get_origin(args[0]) is list:  # an optional list
        hint, args = args[0], list(typing.get_args(args[0]))
    if typing.get_origin(hint) is list:
        return args[0], True
    return (args[0] if args else hint), False


def _check_value(f: dataclasses.Field, value: Any, cfg: TrainConfig) -> None:
    """ConfigError naming ``f``'s flag unless ``value`` has its type, is among its choices and passes its check."""
    spec, name = declaration(f), flag(f.name)
    if value is None and f.default is None:
        return
    kind, many = value_type(f)
    if many and not isinstance(value, list):
        raise ConfigError(f"{name} must be a list, got {value!r}")
    for item in value if many else [value]:
        if kind in (str, bool) and not isinstance(item, kind):
            raise ConfigError(f"{name} must be a {'string' if kind is str else 'boolean'}, got {item!r}")
        try:
            if spec.choices is not None:
                require_choice(name, item, spec.choices)
            if spec.check is not None:
                spec.check(name, item, cfg)
        except (ValueError, TypeError) as err:  # the checks' messages name the option
            raise ConfigError(str(err)) from None


_HINTS = typing.get_type_hints(TrainConfig)
FIELDS: tuple[dataclasses.Field, ...] = dataclasses.fields(TrainConfig)
# The options a resumed run may change; every other one must match the checkpoint.
RESUMABLE: frozenset[str] = frozenset(f.name for f in FIELDS if declaration(f).resumable)


def merge_resumed_config(saved: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """The checkpoint's config with ``overrides``; ConfigError when one changes an option a resumed run must keep."""
    known = {f.name for f in FIELDS}
    base = {k: v for k, v in saved.items() if k in known}
    for name, value in overrides.items():
        if name in RESUMABLE or name not in base:
            continue
        if value != base[name]:
            raise ConfigError(
                f"{flag(name)} {value!r} differs from the checkpoint's {name}={base[name]!r}; "
                "a resumed run must keep its configuration (start a new run in another --out instead)"
            )
    base.update({k: v for k, v in overrides.items() if k in known})
    return TrainConfig(**base)
