#!/usr/bin/env bash
# Stop the dev cluster started by up.sh: cancel its jobs, stop slurmctld, every slurmd and (if up.sh started
# it) munged, and remove the /etc/hosts line. Idempotent: safe to run when nothing is running.
#
#   slurm/dev-cluster/down.sh [--dir DIR]
set -uo pipefail

DIR=${PHILEO_DEV_CLUSTER_DIR:-/tmp/phileo-dev-cluster}
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "down.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
CONF=$DIR/slurm.conf
HOSTS_TAG="# phileo-dev-cluster"
. "$(cd "$(dirname "$0")" && pwd)/lib.sh"
stop_pid() {  # pid name
  local pid=$1 t
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null
  for t in $(seq 1 50); do alive "$pid" || return 0; sleep 0.1; done
  log "$2 ($pid) ignored SIGTERM; killing"
  kill -KILL "$pid" 2>/dev/null
  for t in $(seq 1 20); do alive "$pid" || return 0; sleep 0.1; done
}

if [ -f "$CONF" ] && [ -f "$DIR/run/slurmctld.pid" ] && alive "$(cat "$DIR/run/slurmctld.pid")"; then
  export SLURM_CONF=$CONF
  # Running jobs outlive `scontrol shutdown`: cancel them and wait for the queue to drain.
  if [ -n "$(timeout 5 squeue -h -o %i 2>/dev/null)" ]; then
    timeout 5 scancel --full $(timeout 5 squeue -h -o %A 2>/dev/null) 2>/dev/null
    for t in $(seq 1 100); do
      [ -z "$(timeout 5 squeue -h -t running,pending,completing,requeued -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

# Job steps left behind by a slurmd (slurmstepd) are ours too.
for f in "$DIR"/run/slurmd-*.pid "$DIR"/run/slurmctld.pid; do
  [ -f "$f" ] || continue
  stop_pid "$(cat "$f")" "$(basename "$f" .pid)"
  rm -f "$f"
done
for pid in $(pgrep -f "slurmstepd" 2>/dev/null); do
  grep -qs "$DIR" "/proc/$pid/cmdline" /proc/"$pid"/environ 2>/dev/null && stop_pid "$pid" slurmstepd
done
# slurmd processes whose pid file was lost (e.g. a crashed earlier run) but use this config.
for pid in $(live_pids slurmd) $(live_pids slurmctld); do
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$CONF" && stop_pid "$pid" "slurm daemon"
done

if [ -f "$DIR/run/munged.ours" ]; then
  for pid in $(live_pids munged); do stop_pid "$pid" munged; done
  rm -f "$DIR/run/munged.ours"
fi

if grep -q "$HOSTS_TAG\$" /etc/hosts 2>/dev/null; then
  # /etc/hosts may be a bind mount: rewrite in place rather than replace the file.
  grep -v "$HOSTS_TAG\$" /etc/hosts > "$DIR.hosts.tmp" && cat "$DIR.hosts.tmp" > /etc/hosts && rm -f "$DIR.hosts.tmp"
fi
rm -f "$CONF"
log "stopped"
