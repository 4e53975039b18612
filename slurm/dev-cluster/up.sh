#!/usr/bin/env bash
# Start a real multi-node SLURM cluster on this one machine: munged, slurmctld and one `slurmd -N nodeK`
# per node (Debian's SLURM supports several slurmd per host). For tests and for trying the suite on a
# workstation. Needs root (it installs packages and writes one /etc/hosts line).
#
#   slurm/dev-cluster/up.sh [--nodes N] [--cpus C] [--mem-mb M] [--dir DIR]
#   eval "$(slurm/dev-cluster/up.sh --nodes 4 | tail -n 1)"   # exports SLURM_CONF
#
# Idempotent: when the cluster in DIR already runs with N idle nodes it only prints the export line; a
# different N restarts it. Everything (config, state, spool, logs, pids) lives under DIR
# (default $PHILEO_DEV_CLUSTER_DIR or /tmp/phileo-dev-cluster). Undo with slurm/dev-cluster/down.sh.
set -euo pipefail

NODES=4
CPUS=2
MEM_MB=4000
DIR=${PHILEO_DEV_CLUSTER_DIR:-/tmp/phileo-dev-cluster}
MAX_ARRAY_SIZE=${PHILEO_DEV_MAX_ARRAY_SIZE:-1001}
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=$2; shift 2 ;;
    --cpus) CPUS=$2; shift 2 ;;
    --mem-mb) MEM_MB=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "up.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$NODES" in ''|*[!0-9]*|0) echo "up.sh: --nodes must be a positive integer, got '$NODES'" >&2; exit 2 ;; esac
[ "$NODES" -le 64 ] || { echo "up.sh: --nodes $NODES is more than this dev cluster supports (64)" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")" && pwd)
CONF=$DIR/slurm.conf
HOSTS_TAG="# phileo-dev-cluster"
. "$HERE/lib.sh"

if [ "$(id -u)" != 0 ]; then
  echo "up.sh: must run as root (it starts slurmd/munged and edits /etc/hosts); try: sudo $0 --nodes $NODES" >&2
  exit 3
fi

# 1. Packages (Debian's; ~13 s cold).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "up.sh: SLURM is not installed and there is no apt-get to install it" >&2; exit 3; }
  log "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq slurmctld slurmd slurm-client munge >&2
fi

idle_nodes() { SLURM_CONF=$CONF timeout 5 sinfo -h -t idle -o '%D' 2>/dev/null | awk '{s+=$1} END {print s+0}'; }
total_nodes() { SLURM_CONF=$CONF timeout 5 sinfo -h -o '%D' 2>/dev/null | awk '{s+=$1} END {print s+0}'; }

# 2. Already up with the same size? Then nothing to do.
if [ -f "$CONF" ] && grep -q "^# nodes=$NODES cpus=$CPUS mem=$MEM_MB\$" "$CONF" \
   && [ "$(total_nodes)" = "$NODES" ] && [ "$(idle_nodes)" -ge 1 ]; then
  log "already running with $NODES nodes in $DIR"
  echo "export SLURM_CONF=$CONF"
  exit 0
fi
if [ -f "$CONF" ]; then
  log "restarting (a different or stale cluster is in $DIR)"
  "$HERE/down.sh" --dir "$DIR" >&2
fi

# 3. Config, state and logs under DIR.
mkdir -p "$DIR"/{state,spool,log,run}
HOST=$(hostname -s)
NODELIST="node[1-$NODES]"
[ "$NODES" = 1 ] && NODELIST=node1
LAST_PORT=$((17000 + NODES))
cat > "$CONF" <<CONFEOF
# Written by slurm/dev-cluster/up.sh: a one-machine test cluster. Do not use in production.
# nodes=$NODES cpus=$CPUS mem=$MEM_MB
ClusterName=phileo-dev
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after 10 s instead of 120 s.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=300
MaxArraySize=$MAX_ARRAY_SIZE
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
NodeName=$NODELIST NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-$LAST_PORT CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONFEOF
# A single port range needs the bracket form when there are several nodes.
if [ "$NODES" -gt 1 ]; then sed -i "s/Port=17001-$LAST_PORT/Port=[17001-$LAST_PORT]/" "$CONF"; else sed -i "s/Port=17001-$LAST_PORT/Port=17001/" "$CONF"; fi
export SLURM_CONF=$CONF

# 4. Node names must resolve (MASTER_ADDR=node1): one tagged /etc/hosts line, removed by down.sh.
names=$(for i in $(seq 1 "$NODES"); do printf 'node%s ' "$i"; done)
sed -i "/$HOSTS_TAG\$/d" /etc/hosts
echo "127.0.0.1 ${names}$HOSTS_TAG" >> /etc/hosts

# 5. munged (as the munge user; the package created /etc/munge/munge.key).
if [ -z "$(live_pids munged)" ]; then
  install -d -o munge -g munge -m 755 /run/munge
  [ -f /etc/munge/munge.key ] || { runuser -u munge -- /usr/sbin/mungekey --create >&2 2>/dev/null || /usr/sbin/create-munge-key -f >&2; }
  runuser -u munge -- /usr/sbin/munged
  touch "$DIR/run/munged.ours"
fi

# 6. Controller (clean state), then one slurmd per node.
slurmctld -c -f "$CONF"
for i in $(seq 1 "$NODES"); do slurmd -N "node$i" -f "$CONF"; done

# 7. Wait until every node is idle.
deadline=$((SECONDS + 60))
while [ "$(idle_nodes)" != "$NODES" ]; do
  if [ $SECONDS -ge $deadline ]; then
    log "nodes did not become idle within 60 s; logs in $DIR/log:"
    tail -n 20 "$DIR"/log/*.log >&2 || true
    exit 1
  fi
  sleep 0.2
done
log "$NODES nodes idle ($DIR)"
echo "export SLURM_CONF=$CONF"
