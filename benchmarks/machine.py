"""What the benchmarks ran on: device name, driver/CUDA, library versions; and the results folder.

``python -m benchmarks.machine cpu|cuda`` prints the results folder for this machine, which is
``benchmarks/results/<device-slug>/``.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS_ROOT = Path(__file__).parent / "results"
PACKAGES = ("torch", "triton", "transformers", "flashsae", "sae-lens", "eai-sparsify", "pytest-benchmark", "matplotlib")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """Human-readable name of the device the suite times ("cpu" or "cuda")."""
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def slug(device: str) -> str:
    """Folder name for a device's results, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-7b13``."""
    name = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    if device == "cpu":
        name = "cpu-" + name.removeprefix("cpu-")[:48].strip("-")
    return name


def results_dir(device: str) -> Path:
    return RESULTS_ROOT / slug(device)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def describe(device: str) -> dict[str, Any]:
    """Everything the JSON records about the machine and the software versions."""
    info: dict[str, Any] = {
        "device": device,
        "device_name": device_name(device),
        "slug": slug(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "versions": {name: _version(name) for name in PACKAGES},
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            cuda=torch.version.cuda,
            driver=_nvidia_driver(),
            gpu_memory_bytes=props.total_memory,
            l2_cache_bytes=getattr(props, "L2_cache_size", None),
            sm_count=props.multi_processor_count,
        )
    return info


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("cpu", "cuda"):
        sys.exit("usage: python -m benchmarks.machine cpu|cuda")
    print(results_dir(sys.argv[1]))
