"""Static checks, run as tests because CI runs only pytest: ruff over the sources, tests and
benchmarks, and mypy over ``src/neuqi``, each with its configuration in pyproject.toml.

mypy keeps its cache in ``.mypy_cache`` at the repository root (ignored by git): a first run
takes about a minute, later runs a few seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, check=False)


def test_ruff() -> None:
    r = _run("ruff", "check", "src", "tests", "benchmarks")
    assert r.returncode == 0, f"ruff check failed:\n{r.stdout}{r.stderr}"


def test_mypy() -> None:
    r = _run("mypy", "--config-file", "pyproject.toml")
    assert r.returncode == 0, f"mypy failed:\n{r.stdout}{r.stderr}"
