#!/usr/bin/env bash
# Install Debian's Slurm (slurmctld, slurmd, client tools) when missing; needs root. Used by the Slurm tests and CI.
# The packages' service start is suppressed (policy-rc.d): tools/slurm/cluster.py starts the daemons itself.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "tools/slurm/install.sh: slurmctld/slurmd/sbatch missing and not root; run: sudo apt-get install slurmctld slurmd slurm-client" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
fi
trap '[ "$made_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client >/dev/null
command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null
