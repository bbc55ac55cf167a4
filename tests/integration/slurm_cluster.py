"""Pytest fixture: a real Slurm 22.05 (slurmctld + two slurmd as logical nodes node1/node2) on this host.

Installs Debian's slurm-wlm first when the binaries are missing and we are root (tools/slurm/install.sh), else
skips — except under CI=true, where a missing Slurm is a failure. Tears down only the daemons it started.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.requires import skip_or_fail

REPO = Path(__file__).resolve().parents[2]


def _local_cluster():
    spec = importlib.util.spec_from_file_location("local_cluster", REPO / "tools" / "slurm" / "local_cluster.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ensure_slurm(lc) -> None:
    if not lc.missing_binaries():
        return
    if os.geteuid() != 0:
        skip_or_fail(f"Slurm binaries {lc.missing_binaries()} missing; install with `sudo bash tools/slurm/install.sh`")
    r = subprocess.run(["bash", str(REPO / "tools" / "slurm" / "install.sh")], capture_output=True, text=True)
    if r.returncode or lc.missing_binaries():
        skip_or_fail(f"installing Slurm failed (rc {r.returncode}): {(r.stdout + r.stderr)[-2000:]}")


class Cluster:
    """A running local cluster: `env` has SLURM_CONF; helpers submit and watch jobs."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env
        self.jobs: list[str] = []

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              check=check, **kw)

    def sbatch(self, script: str, *args: str, env: dict | None = None, sbatch_args=()) -> str:
        r = self.run("sbatch", "--parsable", *sbatch_args, script, *args, env=env or {})
        job = r.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def state(self, job: str) -> str:
        """PENDING/RUNNING/... while the controller knows the job (MinJobAge keeps it briefly), else ''."""
        r = self.run("scontrol", "show", "job", job, check=False)
        for tok in r.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return ""

    def field(self, job: str, name: str) -> str:
        r = self.run("scontrol", "show", "job", job, check=False)
        for tok in r.stdout.split():
            if tok.startswith(f"{name}="):
                return tok.split("=", 1)[1]
        return ""

    def wait_until(self, cond, timeout: float, what: str, poll: float = 0.5):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")

    def wait_done(self, job: str, timeout: float) -> str:
        """Wait until the job has left the queue for good; returns its final state."""
        final = {}

        def done():
            s = self.state(job)
            if s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
                final["s"] = s
                return True
            return s == "" and final.setdefault("s", "GONE")

        self.wait_until(done, timeout, f"job {job} to finish (state {self.state(job)!r})")
        return final["s"]

    def nodes_idle(self) -> bool:
        """Every node idle (no job on it, its epilog done)."""
        r = self.run("sinfo", "-h", "-N", "-o", "%t", check=False)
        states = r.stdout.split()
        return bool(states) and all(s == "idle" for s in states)

    def diagnosis(self, job: str, lines: int = 40) -> str:
        """What Slurm knows of a job, and the tail of the daemons' logs (for a failure message)."""
        parts = [self.run("scontrol", "show", "job", job, check=False).stdout]
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    def cancel_all(self) -> None:
        for job in self.jobs:
            self.run("scancel", job, check=False)


@pytest.fixture(scope="module")
def slurm_cluster():
    lc = _local_cluster()
    _ensure_slurm(lc)
    root = Path(tempfile.mkdtemp(prefix="mmpl-slurm-"))  # short: slurmd puts unix sockets under its spool dir
    info = lc.up(root, nodes=2, cpus=2)
    cluster = Cluster(root, {**os.environ, "SLURM_CONF": info["SLURM_CONF"]})
    try:
        yield cluster
    finally:
        cluster.cancel_all()
        try:
            cluster.wait_until(lambda: not cluster.run("squeue", "-h", check=False).stdout.strip(), 30, "empty queue")
        except AssertionError:
            pass
        lc.down(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Visual-needle shards for the tiny preset (`mmpl data synth --kind needle`), built once per session."""
    import sys

    out = tmp_path_factory.mktemp("tiny-shards") / "needle"
    r = subprocess.run([sys.executable, "-m", "megatron_mmpl.cli", "data", "synth", "--kind", "needle", "--out",
                        str(out), "--targets", "1k", "--per-target", "8"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return out
