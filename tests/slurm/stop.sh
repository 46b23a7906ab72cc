#!/usr/bin/env bash
# Stop the test SLURM started by tests/slurm/start.sh: cancel its jobs, then stop slurmd and slurmctld
# by their pid files (only our daemons). munged is left running (harmless, shared with any other user).
set -uo pipefail
STATE="${RECIPE_SLURM_DIR:-/tmp/recipe-slurm}"
export SLURM_CONF="$STATE/slurm.conf"
if [[ -f "$SLURM_CONF" ]] && command -v scancel >/dev/null 2>&1; then
  timeout 10 scancel --full --signal=KILL --state=RUNNING "--user=$(id -un)" 2>/dev/null
  timeout 10 scancel "--user=$(id -un)" 2>/dev/null
fi
for daemon in slurmd slurmctld; do
  pidfile="$STATE/$daemon.pid"
  [[ -f "$pidfile" ]] || continue
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "[slurm] stopped $daemon ($pid)" >&2
  fi
  rm -f "$pidfile"
done
exit 0
