#!/usr/bin/env bash
# A miniature of the paper's comparison on the demo data: the demo teacher, then the same student
# initialisation trained six ways (SFT, vanilla KD, BiLD, DBiLD alignment, Switch-KD, VSD only), each
# evaluated on the demo eval split; prints a markdown table (mean +- std over seeds) and writes
# runs/ablation/{table.md,results.json,ablation.png}. CPU by default, a GPU when present.
#
#   bash launch/ablation.sh [--seeds 3] [--steps N] [--teacher-steps N] [--arms sft switchkd ...] [--out DIR]
#
# Finished runs are reused: rerunning continues an interrupted experiment.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh
bash launch/build_demo.sh
python -m recipe.ablation "$@"
