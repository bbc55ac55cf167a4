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
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${pkgs[@]}" >/dev/null; }; then
    # no package index (an offline GPU host): the tests needing them skip, or fail under CI=true
    echo "[tests] could not install ${pkgs[*]} with apt-get; the tests that need them will say so"
  fi
fi
. "$root/tools/activate.sh"
if [ "${MMPL_VENV:-}" = none ] && ! command -v ruff >/dev/null; then
  echo "[tests] MMPL_VENV=none and no ruff on PATH: lint skipped (CI's venv runs it)"
else
  ruff check .
fi
exec python3 -m pytest "$@"
