"""`MMPL_VENV=none` (a provisioned environment, e.g. an offline GPU host): tools/install.sh installs nothing and
passes when python3 imports the project and its dependencies, else stops with one line naming the fix;
tools/activate.sh then gives `mmpl` as `python3 -m megatron_mmpl.cli`."""

import os
import subprocess
import sys

import pytest

from tests.child_env import child_env
from tests.integration.slurm_cluster import REPO

pytestmark = pytest.mark.integration


def _bash(script: str, python_dir: str, **env: str) -> subprocess.CompletedProcess:
    # python3 on PATH is `python_dir`'s; no `mmpl` installed anywhere on PATH
    path = os.pathsep.join([python_dir, "/usr/bin", "/bin"])
    return subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=child_env(PATH=path, MMPL_VENV="none", **env))


def test_install_none_uses_the_provisioned_python(tmp_path):
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # this interpreter: imports all
    (shim / "python3").chmod(0o755)
    r = _bash(f'bash tools/install.sh && root={REPO} && . tools/activate.sh && type -t mmpl && mmpl --help',
              str(shim))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("function") and "usage" in r.stdout.lower()
    assert "[install]" not in r.stdout + r.stderr  # nothing created or installed


def test_install_none_refuses_a_python_without_the_project(tmp_path):
    empty = tmp_path / "site"
    empty.mkdir()
    r = _bash("bash tools/install.sh", "/usr/bin", PYTHONPATH=str(empty), PYTHONNOUSERSITE="1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stdout + r.stderr
    assert "MMPL_VENV=none" in lines[0] and "PYTHONPATH" in lines[0] and "unset MMPL_VENV" in lines[0]
