# Sourced by launch/quickstart.sh and tests/run.sh: create (once) and activate the project's virtual
# environment, with the project installed in it (`pip install -e .` plus the demo's and the tests' extras).
# Idempotent: reinstalls only when pyproject.toml or requirements.txt changed.
#   RECIPE_VENV=DIR       where the environment lives (default: .venv in the repository root)
#   RECIPE_USE_CURRENT_PYTHON=1   skip the venv and use the python on PATH (e.g. a cluster's CUDA env)
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "${RECIPE_USE_CURRENT_PYTHON:-0}" != "1" ]]; then
  _venv="${RECIPE_VENV:-$_root/.venv}"
  if [[ ! -x "$_venv/bin/python" ]]; then
    echo "[setup] creating virtual environment in $_venv"
    python3 -m venv "$_venv"
  fi
  # shellcheck disable=SC1091
  source "$_venv/bin/activate"
fi
_stamp="$(python -c 'import sys; print(sys.prefix)')/.recipe-requirements.sha256"
_want="$(cat "$_root/pyproject.toml" "$_root/requirements.txt" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$_stamp" || "$(cat "$_stamp")" != "$_want" ]]; then
  echo "[setup] installing the project and its requirements (first run only)"
  python -m pip install -q --upgrade pip setuptools wheel
  if ! python -c 'import torch' 2>/dev/null; then
    # Pinned first: on a CPU machine this resolves to the CPU build and nothing later pulls CUDA wheels.
    python -m pip install -q torch==2.13.0
  fi
  # deepspeed builds from source and imports torch at build time: no build isolation. requirements.txt
  # names the project as `-e .`, which pip resolves from the working directory.
  (cd "$_root" && python -m pip install -q --no-build-isolation -r requirements.txt)
  echo "$_want" > "$_stamp"
fi
# DeepSpeed picks its accelerator at import; without a GPU it must be told to use the CPU.
if ! python -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
