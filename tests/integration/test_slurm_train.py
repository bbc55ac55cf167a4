"""`mmpl train` through launch/slurm/train.sbatch on a real Slurm (tiny preset, 2 nodes x 1 CPU rank, gloo):
a job stopped by `scancel --signal=TERM` mid-run (slurmstepd signals every process of the job step: both ranks
and each rank's two loader workers and checkpoint-writer helper) leaves a complete checkpoint at the step it
reached (not an interval step) and exits 0; a second submission with the same run dir resumes from that step and
finishes."""

import os
import re

import pytest

from tests.integration.slurm_cluster import REPO, slurm_cluster, tiny_shards  # noqa: F401

pytestmark = pytest.mark.integration

SBATCH = str(REPO / "launch" / "slurm" / "train.sbatch")
STEPS = 12  # the whole run; checkpoints come only from the signal and the end (interval 1000)


def _read(path) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _submit(cluster, tmp_path, shards, tag: str):
    env = {"PRESET": "tiny", "MMPL_GPUS_PER_NODE": "1", "MMPL_MASTER_ADDR": "127.0.0.1", "MMPL_WORKDIR": str(REPO),
           "MMPL_RUN_DIR": str(tmp_path / "run"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / f"{tag}-%j.out"
    job = cluster.sbatch(SBATCH, f"data.shards={shards}", f"schedule.train_steps={STEPS}",
                         "checkpoint.interval=1000", "data.num_workers=2", env=env,
                         sbatch_args=["--nodes=2", f"--output={out}", f"--job-name=mmpl-{tag}"])
    return job, str(out).replace("%j", job)


def test_train_signal_checkpoint_and_resume(slurm_cluster, tmp_path, tiny_shards):  # noqa: F811
    from megatron_mmpl.training.checkpoint import complete_steps, latest_step

    ckpt = str(tmp_path / "run" / "checkpoints")
    job, out = _submit(slurm_cluster, tmp_path, tiny_shards, "first")
    slurm_cluster.wait_until(lambda: re.search(rf"0: step [2-9]\d*/{STEPS}\b", _read(out)), 240,
                             f"job {job} to log step 2 (output so far: {_read(out)[-2000:]!r})")
    slurm_cluster.run("scancel", "--signal=TERM", job)
    assert slurm_cluster.wait_done(job, 120) == "COMPLETED", _read(out)[-4000:]
    text = _read(out)
    stopped = latest_step(ckpt)
    assert stopped is not None and 2 <= stopped < STEPS, text[-4000:]
    assert complete_steps(ckpt) == [stopped], "only the signal's checkpoint (interval is 1000)"
    assert "stop signal: saved step" in text and "trainer exited with 0" in text, text[-4000:]
    assert "killed by signal" not in text and not [p for p in os.listdir(ckpt) if p.endswith(".partial")]

    job2, out2 = _submit(slurm_cluster, tmp_path, tiny_shards, "second")
    assert slurm_cluster.wait_done(job2, 300) == "COMPLETED", _read(out2)[-4000:]
    text2 = _read(out2)
    assert re.search(rf"resume at step {stopped}/{STEPS}", text2), text2[-4000:]
    assert f"step {STEPS}/{STEPS}" in text2 and f"step {stopped}/{STEPS} |" not in text2  # continued, not redone
    assert latest_step(ckpt) == STEPS
