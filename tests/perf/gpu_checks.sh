#!/usr/bin/env bash
# Every GPU check of the DBiLD kernels in one run (for a session with a lent GPU, through the device
# tool): correctness against the reference, then speed with a per-kernel breakdown, a sweep of the lane
# kernel's shapes and peaked inputs. Needs torch with CUDA and triton only. Logs go to $OUT (the device
# tool's output folder) or tests/perf/measured/. An estimated 5 minutes on an H200 (not yet timed).
#
# The scripts import `recipe` as an installed package. Where the python on PATH does not import it from
# this checkout (a bare GPU machine), this script first installs the checkout editable, without its
# dependencies and without network: pip install --no-deps --no-build-isolation --no-index -e .
# (setuptools >= 69 and wheel must be there already).
#
#     bash tests/perf/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
# From another folder: in the repository root `import recipe` would find the source tree without an install.
if ! found=$(cd / && python -c 'import os, recipe; print(os.path.dirname(os.path.dirname(os.path.abspath(recipe.__file__))))' \
        2>/dev/null) || [[ "$found" != "$root" ]]; then
  echo "installing $root into $(command -v python) (no dependencies, no network)"
  if ! python -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
    echo "could not install the project; install it into this python first: pip install -e $root" >&2
    exit 2
  fi
fi
out=${OUT:-tests/perf/measured}
mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee "$out/gpu.log"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.log"
status=0
python tests/perf/check_dbild_gpu.py 2>&1 | tee "$out/check.log"; status=$((status | PIPESTATUS[0]))
python tests/perf/bench_dbild.py --rows 1024 4096 16384 --profile 2>&1 | tee "$out/bench.log"
status=$((status | PIPESTATUS[0]))
python tests/perf/bench_dbild.py --rows 4096 --repeats 10 \
    --sweep 3x2048x8x64 3x2048x4x96 3x2048x8x80 4x1024x8x64 4x1024x4x80 3x4096x8x80 2>&1 | tee "$out/sweep.log"
status=$((status | PIPESTATUS[0]))
python tests/perf/bench_dbild.py --rows 4096 --inputs peaked 2>&1 | tee "$out/peaked.log"
status=$((status | PIPESTATUS[0]))

# One optimizer step of the recipe at the TinyLLaVA shape (tests/perf/step_checks.sh, issue #14).
bash tests/perf/step_checks.sh
status=$((status | $?))
exit $status
