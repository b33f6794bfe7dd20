"""--env-backend mjlab (envs/twin.py). Its checks need MyoSuite's mjlab extra, which lives in its own environment
(requirements-mjlab.txt; it pins mujoco 3.11, dm_control needs 3.17): this file runs tests/twin_checks.py with that
environment's Python, and checks here, without the extra, that asking for the twin fails in one line."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from envs.twin import MJLAB_INSTALL
from tests.conftest import assert_one_line_error, run_algo

REPO = Path(__file__).resolve().parents[1]
TWIN_PYTHON = os.environ.get("QFLEX_BENCH_TWIN_PYTHON", str(REPO / ".venv-mjlab" / "bin" / "python"))


@pytest.mark.skipif(importlib.util.find_spec("mjlab") is not None, reason="the mjlab extra is installed here")
def test_without_the_extra_the_twin_is_a_one_line_error_naming_the_install_command(tmp_path):
    proc = run_algo("sac", "--env-id", "myoLegWalk-v0", "--env-backend", "mjlab", "--no-cuda", cwd=tmp_path, check=False)
    assert_one_line_error(proc, MJLAB_INSTALL)
    proc = run_algo(
        "sac", "--env-id", "myoLegWalk-v0", "--env-backend", "mjlab", "--env-workers", "2", cwd=tmp_path, check=False
    )
    assert_one_line_error(proc, "--env-workers and --async-envs are for CPU envs")
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not os.path.exists(TWIN_PYTHON), reason=f"no mjlab environment at {TWIN_PYTHON}: {MJLAB_INSTALL}")
def test_twin_checks_pass_in_the_mjlab_environment():
    """Parity with the CPU env, same-step autoreset and final observations, state restore, SAC and Qflex end to end."""
    proc = subprocess.run(
        [TWIN_PYTHON, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=",
         "tests/twin_checks.py"],
        cwd=REPO, capture_output=True, text=True, timeout=540, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary
    print(sys.executable, "->", TWIN_PYTHON, summary)
