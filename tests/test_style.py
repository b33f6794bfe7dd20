"""Lint and formatting are part of the suite (ruff, line length 127, config in pyproject.toml)."""

import subprocess
import sys

from tests.conftest import REPO


def test_ruff_check():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format():
    proc = subprocess.run([sys.executable, "-m", "ruff", "format", "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
