"""launch/nemo_run/launch.py: the Slurm dry-run renders a complete sbatch script (nodes, tasks = GPUs, signal,
requeue, the per-task wrapper that runs `mmpl train` with the preset and overrides); the LocalExecutor runs the
tiny preset for 2 steps under torchrun and leaves a complete checkpoint; the SlurmExecutor, submitted to a real
local Slurm, trains 3 steps on 2 logical nodes. Skips when nemo_run is not installed (fails under CI=true)."""

import os
import subprocess
import sys

import pytest

from megatron_mmpl.plan.command import PRESET_DIR
from tests.child_env import child_env
from tests.integration.slurm_cluster import REPO, slurm_cluster, tiny_shards  # noqa: F401
from tests.requires import require_module

pytestmark = pytest.mark.integration

require_module("nemo_run", "nemo-run not installed (pip install -e '.[launch]')")

LAUNCH = str(REPO / "launch" / "nemo_run" / "launch.py")


def _launch(tmp_path, *args, timeout=300, env=None):
    env = child_env(NEMORUN_HOME=str(tmp_path / "nemo_home"), PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run([sys.executable, LAUNCH, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_slurm_dry_run_renders_the_script(tmp_path):
    out = tmp_path / "job.sbatch"
    r = _launch(tmp_path, "--preset", "mmprolong-7b", "--executor", "slurm", "--nodes", "4", "--gpus-per-node", "8",
                "--account", "acct", "--partition", "batch", "--time", "02:00:00", "--retries", "2", "--dry-run",
                "--out", str(out), "optim.lr=2e-5")
    assert r.returncode == 0, r.stdout + r.stderr
    script = out.read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=batch", "#SBATCH --time=02:00:00", "#SBATCH --signal=USR1@300",
                 "#SBATCH --account=acct", "export TORCHX_MAX_RETRIES=2", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script, f"{line!r} missing from:\n{script}"
    assert script.count("srun ") >= 1 and "--kill-on-bad-exit=1" in script
    task = (tmp_path / "job.sbatch.task.sh").read_text()
    preset = os.path.join(PRESET_DIR, "mmprolong-7b.yaml")  # resolved as `mmpl plan` resolves it
    assert f"-m megatron_mmpl.cli train --config {preset} run_dir={REPO}/runs/mmprolong-7b optim.lr=2e-5" in task
    assert "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS" in task
    assert "exit 3" in task  # a clean stop on the time-limit signal asks NeMo-Run's script to requeue
    r = subprocess.run(["bash", "-n", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch.task.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_local_executor_trains_two_steps(tmp_path, tiny_shards):  # noqa: F811
    """Run with the venv's python but the venv not activated (its bin/ off PATH): torchrun is found beside it."""
    from megatron_mmpl.training.checkpoint import latest_step

    run_dir = tmp_path / "run"
    venv_bin = os.path.dirname(sys.executable)
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d != venv_bin)
    r = _launch(tmp_path, "--preset", "tiny", "--executor", "local", "--nproc", "2", "--name", "nemo-tiny",
                f"run_dir={run_dir}", f"data.shards={tiny_shards}", "schedule.train_steps=2", "checkpoint.interval=2",
                timeout=600, env={"PATH": path, "VIRTUAL_ENV": ""})
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert latest_step(str(run_dir / "checkpoints")) == 2, log[-4000:]


def test_torchrun_found_beside_the_interpreter_or_shimmed(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("nemo_launch", LAUNCH)
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    monkeypatch.setenv("PATH", "/nowhere")
    beside = os.path.join(os.path.dirname(sys.executable), "torchrun")
    assert launch.put_torchrun_on_path(str(tmp_path / "shim")) == beside
    assert os.environ["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bare" / "python"))  # an interpreter with no torchrun
    shim = launch.put_torchrun_on_path(str(tmp_path / "shim"))
    assert shim == str(tmp_path / "shim" / "torchrun") and os.access(shim, os.X_OK)
    assert f"exec {tmp_path / 'bare' / 'python'} -m torch.distributed.run" in open(shim).read()
    assert os.environ["PATH"].split(os.pathsep)[0] == str(tmp_path / "shim")


def test_slurm_executor_trains_on_a_real_slurm(tmp_path, tiny_shards, slurm_cluster):  # noqa: F811
    """The SlurmExecutor path submitted for real (2 logical nodes, one rank each): its per-task script sets up
    the same rendezvous as train.sbatch and the tiny model trains 3 steps."""
    from megatron_mmpl.training.checkpoint import latest_step

    run_dir = tmp_path / "run"
    env = {"SLURM_CONF": slurm_cluster.env["SLURM_CONF"], "MMPL_MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    r = _launch(tmp_path, "--preset", "tiny", "--executor", "slurm", "--nodes", "2", "--gpus-per-node", "1",
                "--no-gpus", "--name", "nemo-slurm", "--time", "00:10:00", f"run_dir={run_dir}",
                f"data.shards={tiny_shards}", "schedule.train_steps=3", env=env, timeout=600)
    logs = list((tmp_path / "nemo_home").rglob("log-*.out"))
    text = "".join(p.read_text() for p in logs)
    assert r.returncode == 0 and logs, (r.stdout + r.stderr)[-4000:]
    assert "world 2 = tp 1 x pp 1 x cp 1 x dp 2" in text and "done at step 3" in text, text[-4000:]
    assert latest_step(str(run_dir / "checkpoints")) == 3
