#!/usr/bin/env bash
# Create .venv with this machine's python3 (if missing) and install the project into it.
# MMPL_TORCH_SPEC picks the torch build: default "torch==2.13.0" (the CPU wheel this machine kind has on disk);
# GPU users set e.g. MMPL_TORCH_SPEC="torch" (or a CUDA index via PIP_EXTRA_INDEX_URL) before the first run.
# MMPL_EXTRAS picks the extras (default "dev").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MMPL_VENV:-$root/.venv}"
stamp="$venv/.mmpl-installed"
if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating $venv with $(python3 --version)"
  python3 -m venv "$venv"
fi
# Reinstall when setup.cfg changed since the last install.
want="$(sha1sum "$root/setup.cfg" | cut -c1-40)-${MMPL_TORCH_SPEC:-torch==2.13.0}-${MMPL_EXTRAS:-dev}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[install] installing megatron_mmpl[${MMPL_EXTRAS:-dev}] with ${MMPL_TORCH_SPEC:-torch==2.13.0}"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "${MMPL_TORCH_SPEC:-torch==2.13.0}"
  "$venv/bin/python" -m pip install -q -e "$root[${MMPL_EXTRAS:-dev}]" "${MMPL_TORCH_SPEC:-torch==2.13.0}"
  echo "$want" > "$stamp"
fi
