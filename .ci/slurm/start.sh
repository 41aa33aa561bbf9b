#!/usr/bin/env bash
# Start a single-node SLURM 22.05 test cluster (munged, slurmctld, slurmd) by hand, without systemd,
# for tests/test_slurm.py and CI. Run as root on Debian bookworm (or a similar Debian/Ubuntu).
#
# Idempotent: installs the Debian packages only when missing, reuses running daemons, and restarts them
# only when the generated config changed. Stop with .ci/slurm/stop.sh (each daemon by its PID file).
#
# Environment (all optional):
#   STATE=/var/spool/normres-slurm   slurmctld/slurmd state and PID files
#   LOGDIR=/var/log/normres-slurm    daemon logs and jobcomp.txt (one line per finished job)
#   GPUS=2                           fake GPUs on the node (gres gpu:fake:N, no device behind them)
#   MEM_FLOOR_MB=32000               RealMemory announced for the node: max(real memory, this floor)
#   CRED_EXPIRE=10                   seconds a requeued job waits before it may start again
#   INSTALL=auto|0|1                 auto: apt-get install slurm-wlm munge only if missing
#   FORCE=1                          overwrite an /etc/slurm/slurm.conf that this script did not write
# The cluster: partitions `cpu` (default) and `gpu` on one node with all CPUs; no slurmdbd, so `sacct`
# does not work: the profile uses `slurm-status-command: squeue` (MinJobAge=300 keeps finished jobs).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${STATE:-/var/spool/normres-slurm}
LOGDIR=${LOGDIR:-/var/log/normres-slurm}
GPUS=${GPUS:-2}
MEM_FLOOR_MB=${MEM_FLOOR_MB:-32000}
CRED_EXPIRE=${CRED_EXPIRE:-10}
INSTALL=${INSTALL:-auto}
CONF=/etc/slurm/slurm.conf
GRES=/etc/slurm/gres.conf
MARKER="# written by normres .ci/slurm/start.sh"
t0=$(date +%s%N)
log() { printf '[slurm start %5.1fs] %s\n' "$(( ($(date +%s%N) - t0) / 1000000 ))e-3" "$*"; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
waitfor() { # waitfor <seconds> <cmd...>: retry every 0.25 s
  local n=$(( $1 * 4 )); shift
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "timeout waiting for: $*" >&2; return 1
}

[ "$(id -u)" = 0 ] || { echo "start.sh: must run as root (it starts munged/slurmctld/slurmd)" >&2; exit 1; }

# ---- packages -------------------------------------------------------------------------------------
have_all() { for b in munged slurmctld slurmd sbatch squeue scontrol sinfo; do command -v "$b" >/dev/null || return 1; done; }
if [ "$INSTALL" = 1 ] || { [ "$INSTALL" = auto ] && ! have_all; }; then
  export DEBIAN_FRONTEND=noninteractive
  # try the local package lists first (fast), refresh them only if that fails
  { apt-get install -y -qq slurm-wlm munge || { apt-get update -qq && apt-get install -y -qq slurm-wlm munge; }; } >/dev/null
  log "installed slurm-wlm munge"
fi
have_all || { echo "start.sh: slurm/munge binaries missing (apt-get install slurm-wlm munge)" >&2; exit 1; }
mkdir -p "$STATE/ctld" "$STATE/d" "$LOGDIR" /etc/slurm

# ---- munge ----------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  mungekey -c -f -k /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 755 /run/munge
if ! alive /run/munge/munged.pid; then
  runuser -u munge -- /usr/sbin/munged
  touch "$STATE/munged.ours"   # stop.sh stops munged only if we started it
fi
waitfor 10 sh -c 'munge -n | unmunge'
log "munged up (pid $(cat /run/munge/munged.pid))"

# ---- config ---------------------------------------------------------------------------------------
HOST=$(hostname -s)
hw=$(slurmd -C | head -1)
# the node's real topology (CPUs, sockets, cores, threads), and its memory raised to the floor
nodehw=$(tr ' ' '\n' <<<"$hw" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
mem=$(tr ' ' '\n' <<<"$hw" | sed -n 's/^RealMemory=//p')
mem=$(( mem > MEM_FLOOR_MB ? mem : MEM_FLOOR_MB ))
new=$(mktemp)
{ echo "$MARKER"; sed -e "s|@HOST@|$HOST|g" -e "s|@STATE@|$STATE|g" -e "s|@LOGDIR@|$LOGDIR|g" \
    -e "s|@NODEHW@|$nodehw|g" -e "s|@MEM@|$mem|g" -e "s|@GPUS@|$GPUS|g" -e "s|@CRED_EXPIRE@|$CRED_EXPIRE|g" \
    "$HERE/slurm.conf.template"; } > "$new"
if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -qxF "$MARKER" && [ "${FORCE:-0}" != 1 ]; then
  rm -f "$new"
  echo "start.sh: $CONF exists and was not written by this script; refusing to overwrite (FORCE=1 to do it)" >&2
  exit 1
fi
changed=0
cmp -s "$new" "$CONF" || changed=1
# fake GPUs: slurmd only counts a GPU that names a file; harmless character devices stand in
# (no CUDA device exists, so training falls back to the CPU)
gres="$MARKER"
devs=(/dev/null /dev/zero /dev/full /dev/random /dev/urandom)
[ "$GPUS" -le ${#devs[@]} ] || { echo "start.sh: at most ${#devs[@]} fake GPUs" >&2; exit 1; }
for i in $(seq 0 $(( GPUS - 1 ))); do gres+=$'\n'"NodeName=$HOST Name=gpu Type=fake File=${devs[$i]}"; done
[ "$(cat "$GRES" 2>/dev/null)" = "$gres" ] || { echo "$gres" > "$GRES"; changed=1; }
mv "$new" "$CONF"; chmod 644 "$CONF" "$GRES"
log "config: $CONF (node $HOST $nodehw RealMemory=$mem gpu:fake:$GPUS; changed=$changed)"

# ---- slurmctld + slurmd ---------------------------------------------------------------------------
if [ "$changed" = 1 ] && { alive "$STATE/slurmctld.pid" || alive "$STATE/slurmd.pid"; }; then
  log "config changed: restarting the running daemons"
  "$HERE/stop.sh" --keep-munge
fi
# -c: start from a clean state (no jobs left over from an earlier cluster)
alive "$STATE/slurmctld.pid" || slurmctld -c
waitfor 30 scontrol ping
alive "$STATE/slurmd.pid" || slurmd -c
idle() { sinfo -h -n "$HOST" -o %T | grep -Eq '^(idle|mixed|allocated)'; }
if ! waitfor 30 idle; then
  scontrol update nodename="$HOST" state=resume || true
  waitfor 30 idle || { sinfo -R; tail -n 20 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log"; exit 1; }
fi
log "slurmctld (pid $(cat "$STATE/slurmctld.pid")) + slurmd (pid $(cat "$STATE/slurmd.pid")) up"
sinfo -o '%P %a %D %c %m %G %T'
