#!/usr/bin/env bash
# The README's main command: set up, build the embedded demo (data, tokenizer, tiny models), train the
# demo teacher, distil the demo student from it with Switch-KD, then print the final losses and both
# models' accuracy on the demo eval split (the trainer evaluates on data.eval at the end of each run).
# CPU is enough (about 10 minutes on 2 cores); a GPU is used if present.
#
#   bash launch/quickstart.sh
#
# Idempotent: finished steps are skipped (training resumes from its checkpoints), so rerunning after an
# interruption continues. Start over with `rm -rf demo runs/demo_*`.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
export RECIPE_SKIP_SETUP=1  # multinode.sh: the environment is ready

step() { echo; echo "==> $*"; }

bash launch/build_demo.sh

step "training the demo teacher (SFT)"
bash launch/multinode.sh recipe/configs/demo_teacher.yaml
step "distilling the demo student from it with Switch-KD (CE + DBiLD alignment + VSD)"
bash launch/multinode.sh recipe/configs/demo_switchkd.yaml

step "result"
python - <<'PY'
import json
from recipe.evaluate import format_summary
for run in ("runs/demo_teacher", "runs/demo_switchkd"):
    records = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    last = [r for r in records if "loss" in r][-1]
    print(f"{run}: step {last['step']}  loss {last['loss']:.4f}  ce {last['ce']:.4f}  "
          f"align {last['align']:.4f}  vsd {last['vsd']:.4f}")
    print(f"  eval: {format_summary(json.load(open(f'{run}/final/eval.json')))}")
PY
echo "curves (loss terms, lr, grad norm, tokens/s, eval accuracy): $(python -m recipe.plot runs/demo_teacher runs/demo_switchkd)"
