#!/usr/bin/env bash
# Create .venv with this machine's python3 (if missing) and install the project into it.
# MMPL_TORCH_SPEC picks the torch build: default "torch==2.13.0" (the CPU wheel this machine kind has on disk);
# GPU users set e.g. MMPL_TORCH_SPEC="torch" (or a CUDA index via PIP_EXTRA_INDEX_URL) before the first run.
# MMPL_EXTRAS picks the extras (default "dev"). MMPL_VENV=none installs nothing: the python3 on PATH must already
# import the project and its dependencies (tools/activate.sh then uses it as it is).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${MMPL_VENV:-}" = none ]; then
  if ! python3 -c "import megatron_mmpl, megatron.core, transformers, webdataset" 2>/dev/null; then
    echo "[install] MMPL_VENV=none, but $(command -v python3) cannot import megatron_mmpl, megatron.core," \
         "transformers and webdataset: put the checkout and its packages on PYTHONPATH, or unset MMPL_VENV" \
         "to install into $root/.venv" >&2
    exit 1
  fi
  exit 0
fi
venv="${MMPL_VENV:-$root/.venv}"
stamp="$venv/.mmpl-installed"
if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating $venv with $(python3 --version)"
  python3 -m venv "$venv"
fi
# Reinstall when setup.cfg or the torch choice changed since the last install, or when extras are asked for
# that the last install did not include (the stamp holds: setup.cfg hash, torch spec, installed extras).
extras="${MMPL_EXTRAS:-dev}"
key="$(sha1sum "$root/setup.cfg" | cut -c1-40) ${MMPL_TORCH_SPEC:-torch==2.13.0}"
have_key="" have_extras=""
[ -f "$stamp" ] && read -r have_hash have_torch have_extras < "$stamp" && have_key="$have_hash $have_torch"
missing=""
for e in ${extras//,/ }; do
  case ",$have_extras," in *",$e,"*) ;; *) missing="$missing $e" ;; esac
done
if [ "$have_key" != "$key" ] || [ -n "$missing" ]; then
  [ "$have_key" = "$key" ] && extras="$(printf '%s\n' ${have_extras//,/ } ${extras//,/ } | awk '!seen[$0]++' | paste -sd,)"
  echo "[install] installing megatron_mmpl[$extras] with ${MMPL_TORCH_SPEC:-torch==2.13.0}"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "${MMPL_TORCH_SPEC:-torch==2.13.0}"
  "$venv/bin/python" -m pip install -q -e "$root[$extras]" "${MMPL_TORCH_SPEC:-torch==2.13.0}"
  echo "$key $extras" > "$stamp"
fi
