#!/usr/bin/env bash
# Stop the test cluster started by .ci/slurm/start.sh: each daemon by the PID in its PID file
# (TERM, then KILL after 30 s). munged is stopped only if start.sh started it.
#   --keep-munge   leave munged running (start.sh uses this when it restarts slurm after a config change)
#   PURGE=1        also remove the state and log dirs and the slurm.conf/gres.conf that start.sh wrote
# Always exits 0, so it is safe in a CI `trap ... EXIT`.
set -uo pipefail
STATE=${STATE:-/var/spool/normres-slurm}
LOGDIR=${LOGDIR:-/var/log/normres-slurm}
MARKER="# written by normres .ci/slurm/start.sh"
stop() { # stop <name> <pidfile>
  local f=$2 p
  [ -f "$f" ] || { echo "$1: no pid file"; return; }
  p=$(cat "$f")
  if ! kill -0 "$p" 2>/dev/null; then echo "$1: not running"; rm -f "$f"; return; fi
  kill -TERM "$p"
  for _ in $(seq 1 120); do kill -0 "$p" 2>/dev/null || { echo "$1 ($p) stopped"; return; }; sleep 0.25; done
  echo "$1 ($p) did not stop in 30 s, sending KILL"; kill -KILL "$p" 2>/dev/null
}
stop slurmd "$STATE/slurmd.pid"
stop slurmctld "$STATE/slurmctld.pid"
if [ "${1:-}" != --keep-munge ] && [ -f "$STATE/munged.ours" ]; then
  stop munged /run/munge/munged.pid
  rm -f "$STATE/munged.ours"
fi
if [ "${PURGE:-0}" = 1 ]; then
  for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    [ -f "$f" ] && head -1 "$f" | grep -qxF "$MARKER" && rm -f "$f"
  done
  rm -rf "$STATE" "$LOGDIR"
  echo "purged $STATE $LOGDIR"
fi
exit 0
