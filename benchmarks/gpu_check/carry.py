"""Prepare what a bare GPU machine lacks, in one ignored folder to carry there: ``make gpu-carry``.

``python -m benchmarks.gpu_check.carry [--dest .gpu-carry] [--what model,sparsify]`` writes:

- ``model``: ``DEST/minilm``, a compact copy of the embedded all-MiniLM-L6-v2 (fp16 safetensors,
  config and tokenizer files), which ``from_pretrained`` loads from the directory (in float32, as
  flashsae asks). The package's own wheel, with fp32 weights, is about 90 MB.
- ``sparsify`` / ``sae_lens``: ``DEST/wheels``, the Python 3.12 x86-64 wheels of that peer and of
  what importing it needs beyond the GPU image's packages (`benchmarks/README.md` lists the image),
  fetched with ``pip download --no-deps``. ``peers`` means both.

What the folder would weigh is printed, and refused when it would not fit, with the source tree,
in the 64 MiB a call may carry. ``python3 -m benchmarks.gpu_check`` finds both parts there.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CARRY_LIMIT = 64 << 20
# Exact versions (those the project's tests run against). Importing sparsify needs these beyond the
# image; importing sae_lens needs its own list and sparsify's datasets, dill, multiprocess,
# simple-parsing and docstring-parser.
WHEELS = {
    "sparsify": ("eai-sparsify==1.3.3", "simple-parsing==0.1.9", "docstring-parser==0.18.0", "schedulefree==1.4.1",
                 "natsort==8.4.0", "datasets==5.2.0", "multiprocess==0.70.19", "dill==0.4.1"),
    "sae_lens": ("sae-lens==6.54.12", "transformer-lens==3.9.0", "better-abc==0.0.3", "wandb==0.31.0",
                 "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
                 "typing-extensions==4.16.0", "platformdirs==4.14.9", "sniffio==1.3.1",
                 "opentelemetry-api==1.45.2", "opentelemetry-sdk==1.45.2",
                 "opentelemetry-semantic-conventions==0.66b2", "opentelemetry-proto==1.45.2",
                 "opentelemetry-exporter-otlp-proto-http==1.45.2", "opentelemetry-exporter-otlp-proto-common==1.45.2",
                 "opentelemetry-exporter-http-transport==0.66b2", "opentelemetry-exporter-otlp-common==0.66b2",
                 "googleapis-common-protos==1.76.0",
                 "datasets==5.2.0", "multiprocess==0.70.19", "dill==0.4.1", "simple-parsing==0.1.9",
                 "docstring-parser==0.18.0"),
}
CHOICES = ("model", "sparsify", "sae_lens", "peers")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def size_of(path: Path) -> int:
    """Bytes of the files under ``path`` (or of the file)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tree_bytes() -> int:
    """Bytes of the files git would send: tracked plus untracked, not ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())


def write_model(dest: Path) -> Path:
    """The embedded MiniLM, its weights in fp16, saved with save_pretrained into ``dest``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from flashsae.sae.hf import embedded_model_path

    source = embedded_model_path()
    shutil.rmtree(dest, ignore_errors=True)
    model = AutoModel.from_pretrained(source).to(torch.float16)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    return dest


def download_wheels(requirements: list[str], dest: Path) -> None:
    """``pip download --no-deps`` the Python 3.12 manylinux x86-64 wheels of ``requirements`` into ``dest``."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *requirements],
                   check=True)


def selection(what: str) -> tuple[bool, list[str]]:
    """(whether to write the model, the wheels to fetch) for a --what value."""
    parts = {p for p in what.split(",") if p}
    unknown = parts - set(CHOICES)
    if unknown:
        raise SystemExit(f"gpu-carry: --what takes some of {', '.join(CHOICES)}, got {what!r}")
    if "peers" in parts:
        parts |= {"sparsify", "sae_lens"}
    wheels = list(dict.fromkeys(w for peer in ("sparsify", "sae_lens") if peer in parts for w in WHEELS[peer]))
    return "model" in parts, wheels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check.carry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=REPO / ".gpu-carry")
    parser.add_argument("--what", default="model,sparsify", help=f"comma-separated, of {', '.join(CHOICES)}")
    args = parser.parse_args(argv)
    model, wheels = selection(args.what)
    args.dest.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.dest / "site", ignore_errors=True)
    if model:
        write_model(args.dest / "minilm")
    else:
        shutil.rmtree(args.dest / "minilm", ignore_errors=True)
    if wheels:
        download_wheels(wheels, args.dest / "wheels")
    else:
        shutil.rmtree(args.dest / "wheels", ignore_errors=True)
    parts = {name: size_of(args.dest / name) for name in ("minilm", "wheels") if (args.dest / name).exists()}
    tree = tree_bytes()
    total = tree + sum(parts.values())
    for name, n in parts.items():
        print(f"{args.dest / name}: {n / 2**20:.1f} MiB")
    print(f"source tree: {tree / 2**20:.1f} MiB; a call would carry {total / 2**20:.1f} MiB "
          f"of at most {CARRY_LIMIT >> 20} MiB")
    if total > CARRY_LIMIT:
        print(f"gpu-carry: {total / 2**20:.1f} MiB does not fit in one call; carry fewer parts (--what)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
