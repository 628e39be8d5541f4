"""The peers' published test suites: which files run, and where they come from at run time.

Nothing of the peers' tests is stored in this repository. Each run fetches them into a cache
folder: sparsify's source distribution on PyPI ships its ``tests/``; SAELens' does not, so its
tests come from a git checkout of the repository its PyPI metadata names (cloned at the release
tag) or from a local checkout given with ``--saelens-src``. The test files are staged into a
folder of their own (with an empty ``pytest.ini``), so that the installed packages, not the
copies in the source trees, are the ones imported and tested.
"""
from __future__ import annotations

import email.parser
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Suite:
    """A peer's test suite: the PyPI project, the test files to run, and files left out (with why)."""

    peer: str
    project: str
    test_files: tuple[str, ...]
    excluded_on_cpu: dict[str, str] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return importlib.metadata.version(self.project)


SUITES = {
    "sparsify": Suite(
        peer="sparsify",
        project="eai-sparsify",
        test_files=("tests",),
        excluded_on_cpu={
            "tests/test_encode.py": "calls sparsify.fused_encoder directly (no SparseCoder, so nothing is "
            "patched) at N=8192, M=131072: a dense 4 GiB pre-activation matrix, minutes on a CPU",
        },
    ),
    "saelens": Suite(
        peer="saelens",
        project="sae-lens",
        test_files=(
            "tests/saes/test_topk_sae.py",
            "tests/saes/test_sae.py",
            "tests/training/test_sae_trainer.py",
            "tests/refactor_compatibility/test_topk_sae_equivalence.py",
            "tests/analysis/test_hooked_sae.py",
        ),
    ),
}


class SuiteUnavailable(RuntimeError):
    """The suite's tests could not be obtained (the message says what was tried)."""


def _run(cmd: list[str], cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def download_sdist(suite: Suite, cache: Path) -> Path:
    """The unpacked source distribution of the installed version of ``suite.project`` (pip download)."""
    name = f"{suite.project.replace('-', '_')}-{suite.version}"
    root = cache / name
    if root.is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", suite.project,
           f"{suite.project}=={suite.version}", "-d", str(cache)]
    done = _run(cmd)
    archives = sorted(cache.glob(f"{name}.tar.gz"))
    if done.returncode != 0 or not archives:
        raise SuiteUnavailable(f"`{' '.join(cmd[2:])}` failed: {(done.stderr or done.stdout).strip()[-400:]}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(cache, filter="data")
    return root


def repository_url(sdist_root: Path) -> str | None:
    """The ``Repository`` (or ``Source``) URL in an unpacked sdist's PKG-INFO."""
    info = email.parser.Parser().parsestr((sdist_root / "PKG-INFO").read_text())
    for value in info.get_all("Project-URL") or []:
        label, _, url = value.partition(",")
        if label.strip().lower() in ("repository", "source", "source code"):
            return url.strip()
    return None


def clone_release(url: str, version: str, dest: Path) -> Path:
    """A shallow git clone of ``url`` at tag ``v<version>`` (or ``<version>``) in ``dest``."""
    if (dest / "tests").is_dir():
        return dest
    errors = []
    for tag in (f"v{version}", version):
        shutil.rmtree(dest, ignore_errors=True)
        done = _run(["git", "clone", "--quiet", "--depth", "1", "--branch", tag, url, str(dest)])
        if done.returncode == 0:
            return dest
        errors.append(f"tag {tag}: {done.stderr.strip()[-200:]}")
    raise SuiteUnavailable(f"git clone {url} failed ({'; '.join(errors)})")


def source_tree(suite: Suite, cache: Path, local: Path | None) -> tuple[Path, str]:
    """(a source tree holding the suite's ``tests/``, where it came from)."""
    if local is not None:
        if not (local / "tests").is_dir():
            raise SuiteUnavailable(f"{local} has no tests/ folder")
        return local, f"local checkout {local}"
    sdist = download_sdist(suite, cache)
    if (sdist / "tests").is_dir():
        return sdist, f"PyPI sdist {sdist.name}.tar.gz"
    url = repository_url(sdist)
    if url is None:
        raise SuiteUnavailable(f"the sdist {sdist.name} has no tests/ and names no repository")
    tree = clone_release(url, suite.version, cache / f"{suite.peer}-git-{suite.version}")
    return tree, f"git clone of {url} at the v{suite.version} tag (the sdist {sdist.name} has no tests/)"


def stage(tree: Path, dest: Path) -> Path:
    """Copy ``tree/tests`` to ``dest/tests`` next to an empty ``pytest.ini``: the folder the suite runs in."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(tree / "tests", dest / "tests")
    (dest / "pytest.ini").write_text("[pytest]\n")
    return dest
