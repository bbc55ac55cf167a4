#!/usr/bin/env bash
# The whole test suite: installs into .venv if needed (tools/install.sh, with the `launch` and `pdf` extras so the
# NeMo-Run and PDF-input tests run too), then ruff and pytest.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -m unit`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
MMPL_EXTRAS="${MMPL_EXTRAS:-dev,launch,pdf}" bash tools/install.sh
. "${MMPL_VENV:-$root/.venv}/bin/activate"
ruff check .
exec python -m pytest "$@"
