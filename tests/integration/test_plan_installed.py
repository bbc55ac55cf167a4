"""An installed (non-editable) megatron_mmpl plans a shipped preset from any directory: the presets are package
data of megatron_mmpl/plan, not files of the checkout."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.slurm_cluster import REPO

pytestmark = pytest.mark.integration


def test_mmpl_plan_preset_from_a_wheel_outside_the_checkout(tmp_path):
    src, wheels, site, elsewhere = (tmp_path / d for d in ("src", "wheels", "site", "elsewhere"))
    elsewhere.mkdir()
    # build from a copy: setuptools writes build/ and *.egg-info/ next to the sources
    shutil.copytree(REPO / "megatron_mmpl", src / "megatron_mmpl", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, src / f)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(wheels)], check=True,
                   capture_output=True, timeout=600)
    (wheel,) = wheels.glob("megatron_mmpl-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=600)
    # the installed copy first; the parent's PYTHONPATH stays (a machine whose dependencies sit there, as the GPU
    # host's), less this checkout
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env = {"PYTHONPATH": os.pathsep.join([str(site), *kept]), "PATH": "/usr/bin:/bin"}
    where = subprocess.run([sys.executable, "-c", "import megatron_mmpl; print(megatron_mmpl.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(site)), where.stdout  # the installed copy, not the checkout
    r = subprocess.run([sys.executable, "-m", "megatron_mmpl.cli", "plan", "--preset", "mmprolong-7b"], cwd=elsewhere,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "plan mmprolong-7b:" in r.stdout and "fits:" in r.stdout, r.stdout + r.stderr
