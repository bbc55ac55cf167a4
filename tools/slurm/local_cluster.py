"""A throwaway Slurm cluster on this host: one slurmctld and N slurmd as logical nodes node1..nodeN.

For tests and for trying launch/slurm/train.sbatch without a real cluster. Slurm 22.05 runs here without
munge, systemd or cgroups: auth/none + cred/none, proctrack/linuxproc, task/none, jobacct_gather/none,
config_overrides (nodes may claim any CPUs/memory), one `slurmd -N nodeX` per node with its own port.
Usage: `python tools/slurm/local_cluster.py up DIR [--nodes 2]` prints `export SLURM_CONF=...`;
`python tools/slurm/local_cluster.py down DIR` stops exactly the daemons that `up` started (by pid).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from megatron_mmpl.parallel.ports import free_ports

REQUIRED = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")


def missing_binaries() -> list[str]:
    return [b for b in REQUIRED if shutil.which(b) is None]


def _slurm_conf(root: Path, nodes: int, cpus: int, ctld_port: int, node_ports: list[int]) -> str:
    host = socket.gethostname().split(".")[0]
    user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
    lines = [
        "ClusterName=mmpl-local",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/none",
        "CredType=cred/none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/builtin",
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "MinJobAge=2",
        "KillWait=10",
        "InactiveLimit=0",
        "MessageTimeout=30",
        "SlurmdTimeout=60",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
    ]
    for i, port in enumerate(node_ports, start=1):
        lines.append(
            f"NodeName=node{i} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
            "RealMemory=1000 State=UNKNOWN"
        )
    lines.append(f"PartitionName=debug Nodes=node[1-{nodes}] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES")
    return "\n".join(lines) + "\n"


def up(root: str | Path, nodes: int = 2, cpus: int = 2, timeout: float = 60.0) -> dict:
    """Write slurm.conf under `root`, start the daemons, wait until all nodes are idle; returns the env to use."""
    missing = missing_binaries()
    if missing:
        raise RuntimeError(f"Slurm binaries not found: {missing}; install them with `bash tools/slurm/install.sh`")
    root = Path(root).resolve()
    for sub in ("state", "log", *(f"spool/node{i}" for i in range(1, nodes + 1))):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ctld_port, *node_ports = free_ports(nodes + 1)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, nodes, cpus, ctld_port, node_ports))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pids = {}
    log = open(root / "log" / "daemons.out", "ab")  # noqa: SIM115 - stays open for the daemons' lifetime
    # -D: stay in the foreground so the pid we hold is the daemon's; -c: start from a clean state; -i: ignore
    # leftover state errors.
    ctld = subprocess.Popen(["slurmctld", "-D", "-c", "-i"], env=env, stdout=log, stderr=log, start_new_session=True)
    pids["slurmctld"] = ctld.pid
    _write_pids(root, pids)
    time.sleep(0.5)
    for i in range(1, nodes + 1):
        d = subprocess.Popen(["slurmd", "-D", "-N", f"node{i}"], env=env, stdout=log, stderr=log,
                             start_new_session=True)
        pids[f"slurmd.node{i}"] = d.pid
        _write_pids(root, pids)
    info = {"SLURM_CONF": str(conf), "root": str(root), "pids": pids, "nodes": nodes}
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for name, pid in pids.items():
            if not _alive(pid):
                down(root)
                raise RuntimeError(f"{name} (pid {pid}) exited at start; see {root}/log/")
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True)
        last = (r.stdout + r.stderr).strip()
        states = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
        if r.returncode == 0 and len(states) == nodes and all(s == "idle" for s in states.values()):
            return info
        time.sleep(0.5)
    down(root)
    raise RuntimeError(f"Slurm nodes not idle after {timeout:.0f}s (sinfo: {last!r}); see {root}/log/")


def down(root: str | Path, grace: float = 10.0) -> None:
    """Stop the daemons recorded in ROOT/pids.json (only those), TERM then KILL."""
    path = Path(root) / "pids.json"
    if not path.exists():
        return
    pids = json.loads(path.read_text())
    for pid in pids.values():
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        time.sleep(0.2)
    for pid in pids.values():
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    for pid in pids.values():
        _reap(pid)
    path.unlink()


def _write_pids(root: Path, pids: dict) -> None:
    (root / "pids.json").write_text(json.dumps(pids))


def _alive(pid: int) -> bool:
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("dir", help="directory for slurm.conf, state, spool and logs")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2, help="CPUs each logical node claims")
    args = p.parse_args(argv)
    if args.action == "down":
        down(args.dir)
        return 0
    info = up(args.dir, args.nodes, args.cpus)
    print(f"export SLURM_CONF={info['SLURM_CONF']}")
    print(f"# daemons: {info['pids']}; stop with: python {sys.argv[0]} down {args.dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
