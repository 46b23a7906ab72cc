#!/usr/bin/env bash
# Build the embedded demo once (used by quickstart.sh and ablation.sh): demo/data (LLaVA JSON + images ->
# train/eval shards, tokenizer) and the tiny random-init demo/models/{teacher,student}_init. Skips what exists.
# Expects the environment of launch/setup_env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -f demo/data/train/index.json ]]; then
  echo "==> building demo data (LLaVA JSON + images -> shards, tokenizer) in demo/data"
  python data_prep/make_demo_data.py --out demo/data
fi
for role in teacher student; do
  if [[ ! -f demo/models/${role}_init/config.json ]]; then
    echo "==> writing the tiny random-init demo $role"
    seed=$([[ $role == teacher ]] && echo 0 || echo 1)
    python -m recipe.models.tiny --preset demo-$role --tokenizer demo/data/tokenizer \
      --out demo/models/${role}_init --seed "$seed"
  fi
done
