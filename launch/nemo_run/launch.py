"""Run `mmpl train` through NeMo-Run (the `nemo-run` package, NeMo's launcher): locally or on Slurm.

  # this machine, torchrun with N ranks
  python launch/nemo_run/launch.py --preset tiny --executor local --nproc 2 data.shards=DIR
  # Slurm, one task per GPU (same per-rank env as launch/slurm/train.sbatch); --dry-run writes the sbatch script
  python launch/nemo_run/launch.py --preset mmprolong-7b --executor slurm --nodes 4 --gpus-per-node 8 \
      --account ACCT --partition batch --time 04:00:00 [--retries 3] [--dry-run]

Extra `section.key=value` arguments override the preset, as with `mmpl train`. The run directory (and so the
checkpoint that a later launch resumes) is runs/<name> unless overridden with run_dir=...
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What every rank gets (user env wins on Slurm through the wrapper's `:=`), as in train.sbatch.
RANK_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN",
            "TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "PYTHONUNBUFFERED": "1"}
REQUEUE_EXIT = 3  # a rank stopped by the time-limit signal exits with this so NeMo-Run's sbatch requeues it


def preset_path(spec: str) -> str:
    """A recipe path or a shipped preset name, resolved as `mmpl plan` resolves it."""
    from megatron_mmpl.plan.command import preset_path as resolve

    try:
        return os.path.abspath(resolve(spec))
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None


def train_args(args) -> list[str]:
    """`-m megatron_mmpl.cli train --config P overrides...` arguments (run_dir defaults to runs/<name>)."""
    overrides = list(args.overrides)
    if not any(o.startswith("run_dir=") for o in overrides):
        overrides.insert(0, f"run_dir={os.path.join(args.workdir, 'runs', args.name)}")
    return ["train", "--config", preset_path(args.preset), *overrides]


def slurm_wrapper(args) -> str:
    """The per-task script: torch.distributed env from Slurm's, then the trainer. The shell stays (not exec) to
    turn a signal-driven clean stop into REQUEUE_EXIT when retries are allowed; every process of the step gets
    Slurm's signal, so the trainer sees it directly."""
    train = " ".join(shlex.quote(a) for a in [args.python, "-m", "megatron_mmpl.cli", *train_args(args)])
    venv = os.path.join(args.workdir, ".venv", "bin", "activate")
    defaults = "\n".join(f': "${{{k}:={v}}}"; export {k}' for k, v in RANK_ENV.items())
    return f"""cd {shlex.quote(args.workdir)}
if [ -f {shlex.quote(venv)} ]; then . {shlex.quote(venv)}; fi
{defaults}
export MASTER_ADDR="${{MMPL_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}}"
export MASTER_PORT="${{MMPL_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}}"
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE
stopped=0
trap 'stopped=1' USR1 TERM
{train} &
pid=$!
while :; do
  wait $pid; rc=$?
  if [ $rc -gt 128 ] && kill -0 $pid 2>/dev/null; then continue; fi
  break
done
if [ $stopped = 1 ] && [ $rc = 0 ] && [ {args.retries} -gt 0 ]; then exit {REQUEUE_EXIT}; fi
exit $rc
"""


def put_torchrun_on_path(shim_dir: str) -> str:
    """Make `torchrun` (which NeMo-Run's local launcher runs by name) resolve for this interpreter, also when its
    venv is not activated: the torchrun beside sys.executable, else a shim in `shim_dir` running
    `python -m torch.distributed.run`. Returns the torchrun used."""
    beside = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.access(beside, os.X_OK):
        os.makedirs(shim_dir, exist_ok=True)
        beside = os.path.join(shim_dir, "torchrun")
        with open(beside, "w") as f:
            f.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m torch.distributed.run "$@"\n')
        os.chmod(beside, 0o755)
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(beside), os.environ.get("PATH", "")])
    return beside


def build(args):
    """(task, executor) for the chosen executor."""
    import nemo_run as run
    from nemo_run.config import get_nemorun_home

    if args.executor == "local":
        put_torchrun_on_path(os.path.join(get_nemorun_home(), "bin"))
        task = run.Script(path="megatron_mmpl.cli", args=train_args(args), entrypoint=args.python, m=True,
                          env=dict(RANK_ENV))
        executor = run.LocalExecutor(ntasks_per_node=args.nproc, launcher="torchrun")
        return task, executor
    task = run.Script(inline=slurm_wrapper(args))
    executor = run.SlurmExecutor(
        account=args.account, partition=args.partition, nodes=args.nodes, ntasks_per_node=args.gpus_per_node,
        gpus_per_node=args.gpus_per_node if args.gpus_per_node and not args.no_gpus else None, time=args.time,
        exclusive=True, signal=f"USR1@{args.signal_seconds}", retries=args.retries,
        # Submit from this machine; job files go to NeMo-Run's experiment dir ($NEMORUN_HOME, on the shared FS),
        # where LocalTunnel expects them. No packaging: the ranks read the checkout in place.
        tunnel=run.LocalTunnel(job_dir=os.path.join(get_nemorun_home(), "experiments")), packager=run.Packager(),
    )
    return task, executor


def dry_run(args, task, executor) -> str:
    """Render the Slurm script NeMo-Run would submit; returns its path (a copy at --out when given), with the
    per-task script beside it as <path>.task.sh."""
    import nemo_run as run

    with run.Experiment(args.name, executor=executor, log_level="WARN") as exp:
        exp.add(task, name=args.name, tail_logs=False)
        exp.dryrun(log=False, delete_exp_dir=False)
        found = sorted(glob.glob(os.path.join(exp._exp_dir, "**", "*_sbatch.sh"), recursive=True))
    if not found:
        raise SystemExit(f"NeMo-Run wrote no sbatch script under {exp._exp_dir}")
    out = args.out or found[0]
    if args.out:
        shutil.copyfile(found[0], out)
    with open(f"{out}.task.sh", "w") as f:  # what each srun task runs (NeMo-Run writes it only on submit)
        f.write(task.inline)
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mmprolong-7b", help="launch/presets/<name> or a recipe YAML path")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--name", default=None, help="experiment/run name (default: the preset's name)")
    p.add_argument("--workdir", default=REPO, help="the checkout the ranks run in (on Slurm: on the shared FS)")
    p.add_argument("--python", default="python", help="interpreter of the ranks (the workdir's .venv is activated)")
    p.add_argument("--nproc", type=int, default=1, help="local: ranks (torchrun --nproc-per-node)")
    p.add_argument("--nodes", type=int, default=1, help="slurm: nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="slurm: ranks (and GPUs) per node")
    p.add_argument("--no-gpus", action="store_true", help="slurm: request no GPUs (CPU test clusters)")
    p.add_argument("--account", default="", help="slurm: account")
    p.add_argument("--partition", default=None, help="slurm: partition")
    p.add_argument("--time", default="04:00:00", help="slurm: time limit")
    p.add_argument("--signal-seconds", type=int, default=300, help="slurm: USR1 this long before the time limit")
    p.add_argument("--retries", type=int, default=0, help="slurm: requeues after a time-limit stop or a failure")
    p.add_argument("--dry-run", action="store_true", help="slurm: write the sbatch script, do not submit")
    p.add_argument("--out", default=None, help="with --dry-run: copy the script here")
    p.add_argument("--detach", action="store_true", help="return after submitting (slurm)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for mmpl train")
    args = p.parse_args(argv)
    args.name = args.name or os.path.basename(args.preset).removesuffix(".yaml")
    args.workdir = os.path.abspath(args.workdir)
    if args.dry_run and args.executor != "slurm":
        p.error("--dry-run renders the Slurm script; use it with --executor slurm")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    try:
        import nemo_run as run
    except ImportError:
        print("nemo_run is not installed: pip install -e '.[launch]' (or pip install nemo-run)", file=sys.stderr)
        return 2
    task, executor = build(args)
    if args.dry_run:
        path = dry_run(args, task, executor)
        print(f"sbatch script: {path}\nper-task script: {path}.task.sh")
        return 0
    with run.Experiment(args.name, executor=executor) as exp:
        exp.add(task, name=args.name, tail_logs=not args.detach)
        exp.run(detach=args.detach, tail_logs=not args.detach)
        status = exp.status(return_dict=True) or {}
    states = [str(v.get("status", "")) for v in status.values()] if isinstance(status, dict) else []
    return 1 if any("FAILED" in s for s in states) else 0  # the local executor mostly reports UNKNOWN


if __name__ == "__main__":
    sys.exit(main())
