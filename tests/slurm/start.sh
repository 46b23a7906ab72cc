#!/usr/bin/env bash
# Start (installing it first if needed) a real single-node SLURM on this machine, for tests/test_launchers.py
# and for trying launch/slurm.sbatch by hand. Idempotent: a running, healthy instance is reused.
#
#   bash tests/slurm/start.sh        # prints the line to eval:  export SLURM_CONF=...
#   eval "$(bash tests/slurm/start.sh | tail -1)"; sbatch ...; squeue
#   bash tests/slurm/stop.sh         # stop the daemons (munged is left running)
#
# Must run as root (CI runs as root on a fresh Debian/Ubuntu machine). Installs the Debian packages
# slurmctld slurmd slurm-client munge with apt-get when they are missing.
# The configuration and every piece of state live in RECIPE_SLURM_DIR (default /tmp/recipe-slurm);
# /etc/slurm is not touched, so clients need SLURM_CONF=$RECIPE_SLURM_DIR/slurm.conf.
# Exit status: 0 running; 2 SLURM cannot be installed here (the caller may skip); 1 any other failure.
set -euo pipefail

STATE="${RECIPE_SLURM_DIR:-/tmp/recipe-slurm}"
CONF="$STATE/slurm.conf"
export SLURM_CONF="$CONF"
log() { echo "[slurm] $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  log "must run as root (slurmd runs jobs as any user; munged and apt-get need root)"; exit 2
fi

# ---- packages
need=()
for bin in slurmctld slurmd sbatch munged; do command -v "$bin" >/dev/null 2>&1 || need+=("$bin"); done
if (( ${#need[@]} )); then
  log "installing slurmctld slurmd slurm-client munge (missing: ${need[*]})"
  if ! command -v apt-get >/dev/null 2>&1; then log "no apt-get on this machine: cannot install SLURM"; exit 2; fi
  pkgs=(slurmctld slurmd slurm-client munge)
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$STATE.apt.log" 2>&1; then
    apt-get update -q >>"$STATE.apt.log" 2>&1 || true
    if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$STATE.apt.log" 2>&1; then
      tail -20 "$STATE.apt.log" >&2; log "apt-get could not install SLURM (log: $STATE.apt.log)"; exit 2
    fi
  fi
fi

# ---- munge (authentication between the daemons and the clients)
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  if id munge >/dev/null 2>&1; then
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
    runuser -u munge -- munged
  else
    munged --force
  fi
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n </dev/null | unmunge >/dev/null || { log "munged does not answer"; exit 1; }
fi

# ---- the configuration: this host, with the CPUs, sockets/cores/threads and memory slurmd sees
mkdir -p "$STATE/ctld" "$STATE/d"
host="$(hostname -s)"
node="$(slurmd -C | head -1)"
[[ "$node" == NodeName=* ]] || { log "slurmd -C failed: $node"; exit 1; }
node="$(sed -E "s/^NodeName=[^ ]+/NodeName=$host NodeAddr=127.0.0.1/" <<<"$node")"
getent hosts "$host" >/dev/null || log "warning: $host does not resolve; jobs use it as MASTER_ADDR"
want="$(cat <<CONF
# Written by tests/slurm/start.sh: single-node test cluster; all state under $STATE.
ClusterName=recipe
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Look at pending jobs every 2 s (default 60 s): a requeued job starts again promptly.
SchedulerParameters=sched_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# SIGTERM -> SIGKILL grace for job steps: the trainer needs it to finish a step and save.
KillWait=60
JobRequeue=1
ReturnToService=2
InactiveLimit=0
MinJobAge=3600
SlurmdTimeout=300
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
)"

# ---- reuse a healthy running instance
running() { [[ -f "$STATE/$1.pid" ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }
node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -1; }
if [[ -f "$CONF" && "$(cat "$CONF")" == "$want" ]] && running slurmctld && running slurmd &&
   scontrol ping 2>/dev/null | grep -q UP; then
  case "$(node_state)" in
    idle*|alloc*|mix*|completing*)
      log "reusing the running SLURM ($CONF)"; echo "export SLURM_CONF=$CONF"; exit 0 ;;
  esac
fi

# ---- (re)start: stop anything of ours that is half up (or runs another configuration)
"$(dirname "$0")/stop.sh" >/dev/null 2>&1 || true
printf '%s\n' "$want" >"$CONF"

log "starting slurmctld and slurmd ($CONF)"
slurmctld -f "$CONF" -c -i
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
slurmd -f "$CONF"
for _ in $(seq 150); do
  case "$(node_state)" in
    idle*) log "up: $(sinfo -h -N -o '%N %T cpus=%c mem=%m')"; echo "export SLURM_CONF=$CONF"; exit 0 ;;
    down*|drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.2
done
log "the node did not become idle: $(sinfo -N 2>&1 | tail -1)"
tail -20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
exit 1
