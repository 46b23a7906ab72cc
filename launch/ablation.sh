#!/usr/bin/env bash
# A miniature of the paper's comparison on the demo data: the demo teacher, then the same student
# initialisation trained six ways (SFT, vanilla KD, BiLD, DBiLD alignment, Switch-KD, VSD only) on each seed's
# data order, each scored on the demo eval split; prints a markdown table (accuracy per arm, and per arm the
# paired difference against SFT and against DBiLD alignment with a 95% t interval over seeds and the seeds
# won) and writes runs/ablation/{table.md,results.json,ablation.png}. CPU by default, a GPU when present.
#
#   bash launch/ablation.sh [--seeds 5] [--first-seed S | --seed-list S [S ...]] [--steps N] [--teacher-steps N]
#                           [--arms sft switchkd ...] [--out DIR]
#
# --seeds N runs seeds S..S+N-1 (S: --first-seed, default 0). Finished runs are reused whatever seed list
# names them: rerunning continues an interrupted experiment, and new seeds train only the new runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
bash launch/build_demo.sh
python -m recipe.ablation "$@"
