#!/usr/bin/env bash
# The whole test suite: installs into .venv if needed (tools/install.sh, with the `launch`, `pdf` and `http` extras
# so the NeMo-Run, PDF-input and remote-shard tests run too) and nginx, then ruff and pytest.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -m unit`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
MMPL_EXTRAS="${MMPL_EXTRAS:-dev,launch,pdf,http}" bash tools/install.sh
# nginx serves shards over HTTP (with Range support) to tests/integration/test_remote_shards.py; g++ is inductor's
# CPU compiler (tests/unit/attention/test_qkv_rope.py compiles the kernel CUDA runs)
pkgs=()
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then pkgs+=(nginx-light); fi
if ! command -v g++ >/dev/null; then pkgs+=(g++); fi
if [ ${#pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "${pkgs[@]}" >/dev/null
  elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq "${pkgs[@]}" >/dev/null
  fi
fi
. "${MMPL_VENV:-$root/.venv}/bin/activate"
ruff check .
exec python -m pytest "$@"
