#!/usr/bin/env bash
# bench_step's figures (issue #14) in one go: one optimizer step of the recipe at the TinyLLaVA shape on one
# GPU, for SFT and Switch-KD (chunked loss head, unchunked, gradient checkpointing), with the per-phase
# breakdown, peak memory and MFU; one JSON line per mode as it finishes, then a table. Logs to $OUT (the device
# tool's output folder) or tests/perf/measured/. Estimated 2-3 minutes on an H200 (not yet timed); a 5-minute
# timeout keeps the modes done so far. tests/perf/gpu_checks.sh runs it last.
#
#     bash tests/perf/step_checks.sh
#     STEP_SHAPE=demo STEP_DEVICE=cpu bash tests/perf/step_checks.sh      # the same lines on the CPU
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-tests/perf/measured}
mkdir -p "$out"
timeout 300 python tests/perf/bench_step.py --shape "${STEP_SHAPE:-tinyllava}" --device "${STEP_DEVICE:-cuda}" \
    --steps 5 --warmup 2 --mode switchkd sft switchkd_unchunked switchkd_gc 2>&1 | tee "$out/bench_step.log"
exit "${PIPESTATUS[0]}"
