"""Run one staged suite under pytest, unpatched and patched, and read each test's outcome."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

PLUGIN_DIR = Path(__file__).parent / "plugin"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _environment(patched: bool, stats: Path) -> dict[str, str]:
    """The subprocess environment: our tree and the plugin importable, the run's switches set."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGIN_DIR), str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["FLASHSAE_CONFORMANCE_PATCH"] = "1" if patched else "0"
    env["FLASHSAE_CONFORMANCE_STATS"] = str(stats)
    if not torch.cuda.is_available():
        env["FLASHSAE_CONFORMANCE_CPU"] = "1"
        env["SPARSIFY_DISABLE_TRITON"] = "1"  # sparsify's own switch to its CPU (embedding_bag) decoder
    return env


def run_pytest(
    staged: Path, files: list[str], deselect: list[str], patched: bool, logs: Path, timeout: int
) -> tuple[dict[str, dict[str, str]], dict[str, int]]:
    """(`outcomes` of one pytest run in ``staged``, the plugin's stats).

    pytest's output goes to ``logs/<patched|unpatched>.log``.
    """
    tag = "patched" if patched else "unpatched"
    logs.mkdir(parents=True, exist_ok=True)
    junit, stats = logs / f"{tag}.xml", logs / f"{tag}-stats.json"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *files, "-p", "flashsae_conformance", "-p", "no:cacheprovider",
           "-o", "addopts=", "-q", "-rN", f"--junitxml={junit}", "--timeout=900"]
    cmd += [f"--ignore={path}" for path in deselect]
    with open(logs / f"{tag}.log", "w") as log:
        subprocess.run(cmd, cwd=staged, env=_environment(patched, stats), stdout=log, stderr=subprocess.STDOUT,
                       timeout=timeout, check=False)
    if not junit.is_file():
        raise RuntimeError(f"pytest wrote no report; see {logs / f'{tag}.log'}")
    return outcomes(junit), json.loads(stats.read_text()) if stats.is_file() else {}


def outcomes(junit: Path) -> dict[str, dict[str, str]]:
    """Each test case of a JUnit XML report, ``dotted.module[.Class]::name`` ->
    {"outcome": passed | failed | error | skipped, "message": the first line of the failure, if any}."""
    result: dict[str, dict[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if result.get(test_id, {}).get("outcome") in ("failed", "error"):  # a teardown error keeps the call's failure
            continue
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "").strip().splitlines()[0][:300] if child.get("message") else ""
                break
        result[test_id] = {"outcome": outcome, "message": message}
    return result
