#!/usr/bin/env bash
# Start the trainer on this node with torchrun (static rendezvous). The same command starts every node
# of a multi-node job; only NODE_RANK differs (launch/slurm.sbatch does this through srun).
#
#   bash launch/multinode.sh CONFIG [--set key=value ...]
#
# Topology, from the environment (defaults: one node, every GPU on it):
#   NNODES          number of nodes                                   (default 1)
#   NODE_RANK       this node, 0..NNODES-1                            (default 0)
#   MASTER_ADDR     host of node 0, reachable from every node         (default 127.0.0.1)
#   MASTER_PORT     a free TCP port on MASTER_ADDR                    (default 29500)
#   NPROC_PER_NODE  processes on this node (default: the number of visible GPUs; with no GPU,
#                   2 CPU processes on gloo with DS_ACCELERATOR=cpu)
# Environment:
#   RECIPE_SKIP_SETUP=1  do not source launch/setup_env.sh; use the python already on PATH
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun gives workers after forwarding SIGTERM (default here 300)
#
# Signals (the trainer saves a checkpoint at the next optimizer step and exits 0 on SIGTERM or SIGUSR1):
#   SIGTERM to this script's pid (it execs torchrun, so that is torchrun): torchrun forwards SIGTERM to
#     every local worker, waits up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds for them to exit (torch's
#     default, 30 s, is too short to finish a step and write a large checkpoint, hence 300 here), then
#     SIGKILLs what is left. torchrun itself then exits non-zero (it re-raises the signal as
#     SignalException) even though the workers saved and exited 0: rerun the same command to resume.
#   SIGUSR1: torchrun has no handler for it and would die (leaving orphaned workers), so it is ignored
#     here (`trap '' USR1` is inherited across exec as SIG_IGN). Send USR1 to the workers themselves
#     (SLURM does: `scancel --signal=USR1` and `--signal=USR1@T` signal every process of the step);
#     they install their own handler once the trainer is up (until then they ignore it too).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if (( $# < 1 )) || [[ "$1" == -* ]]; then
  echo "usage: bash launch/multinode.sh CONFIG [--set key=value ...]" >&2
  exit 2
fi
CONFIG="$1"
shift

if [[ "${RECIPE_SKIP_SETUP:-0}" != "1" ]]; then
  # shellcheck disable=SC1091
  source "$ROOT/launch/setup_env.sh"
fi
# The workers import the recipe from the python on PATH: it must be this checkout (pip install -e .).
if ! _found="$(python -c 'import os, recipe; print(os.path.dirname(os.path.dirname(os.path.abspath(recipe.__file__))))' 2>&1)" \
    || [[ "$_found" != "$ROOT" ]]; then
  echo "[launch] the python on PATH ($(command -v python)) does not import the recipe from $ROOT" \
       "(${_found##*$'\n'}); install this checkout into it: pip install -e $ROOT" >&2
  exit 2
fi

count_gpus() {
  if [[ "${DS_ACCELERATOR:-}" == "cpu" ]]; then echo 0; return; fi
  if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
    # What the job may use (SLURM --gres and schedulers set it); "" or -1 hides every GPU.
    local visible="${CUDA_VISIBLE_DEVICES// /}"
    if [[ -z "$visible" || "$visible" == -1* ]]; then echo 0; else tr ',' '\n' <<<"$visible" | grep -c .; fi
    return
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    return
  fi
  python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS="$(count_gpus)"
if (( GPUS > 0 )); then
  NPROC_PER_NODE="${NPROC_PER_NODE:-$GPUS}"
  DEVICE="cuda, nccl, $GPUS GPU(s) visible"
else
  export DS_ACCELERATOR=cpu
  NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
  DEVICE="cpu, gloo"
fi
if ! (( NODE_RANK >= 0 && NODE_RANK < NNODES )); then
  echo "[launch] NODE_RANK=$NODE_RANK is outside 0..$((NNODES - 1)) (NNODES=$NNODES)" >&2
  exit 2
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"

echo "[launch] $(hostname): node $NODE_RANK of $NNODES, $NPROC_PER_NODE process(es) per node" \
     "(world size $((NNODES * NPROC_PER_NODE))), rendezvous $MASTER_ADDR:$MASTER_PORT, $DEVICE;" \
     "config $CONFIG${*:+ $*}"

trap '' USR1
exec python -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --nproc_per_node "$NPROC_PER_NODE" \
  -m recipe.train --config "$CONFIG" "$@"
