# Sourced by the project's scripts after tools/install.sh: activate the environment it made (MMPL_VENV, default
# <checkout>/.venv). MMPL_VENV=none uses the python3 on PATH as it is (a provisioned container, or a machine with
# no package index and the dependencies on PYTHONPATH); `mmpl` is then `python3 -m megatron_mmpl.cli` unless an
# installed `mmpl` is on PATH. Expects $root (the checkout).
if [ "${MMPL_VENV:-}" = none ]; then
  if ! command -v mmpl >/dev/null; then
    mmpl() { python3 -m megatron_mmpl.cli "$@"; }
    export -f mmpl
  fi
else
  . "${MMPL_VENV:-$root/.venv}/bin/activate"
fi
