#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests of `--launcher slurm` (and for trying it).
#
#   bash scripts/slurm_cluster.sh start    install (Debian's slurm-wlm + munge) if missing, configure, start;
#                                          idempotent: a cluster that already answers is left as it is
#   bash scripts/slurm_cluster.sh stop     stop the daemons this script started (by their pid files)
#   bash scripts/slurm_cluster.sh status   sinfo, or exit 1 when no controller answers
#
# Needs root (the daemons run as root and munge as its own user). Without root `start` says so
# and exits 3; the SLURM tests then skip with that reason. The configuration is written only when
# /etc/slurm/slurm.conf is absent or was written by this script (its first line says so).
set -euo pipefail

STATE=/var/lib/gpt2-slurm      # pid files, spool and logs of this cluster
CONF=/etc/slurm/slurm.conf
MARK="# written by gpt2 scripts/slurm_cluster.sh"

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "slurm_cluster: needs root to install and start slurmctld, slurmd and munged" >&2
    exit 3
  fi
}

# the controller answers and the node takes jobs (idle, mixed, allocated, completing, ...)
answers() {
  local state
  state=$(timeout 10 sinfo -h -o '%t' 2>/dev/null | head -1) || return 1
  [ -n "$state" ] && ! [[ "$state" =~ ^(down|drain|drng|fail|unk|inval|boot|maint|futr|npc|pow|resv) ]]
}

install() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
  echo "slurm_cluster: installing slurm-wlm and munge from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
}

configure() {
  local host cpus mem
  host=$(hostname)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))  # MiB, 80% of the machine
  mkdir -p "$STATE"/{ctld,d,log} /etc/slurm /run/munge /var/log/munge /var/lib/munge
  if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -qF "$MARK"; then
    echo "slurm_cluster: $CONF exists and is not ours: using it as it is"
  else
    cat >"$CONF" <<EOF
$MARK
ClusterName=gpt2test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  fi
  if [ ! -s /etc/munge/munge.key ]; then mungekey -c -f -k /etc/munge/munge.key; fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 400 /etc/munge/munge.key
  chmod 700 /etc/munge
}

start() {
  need_root
  if answers; then echo "slurm_cluster: already running"; sinfo; return; fi
  install
  configure
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  fi
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 1 90); do
    if answers; then sinfo; return; fi
    # a node that came back from an earlier, unclean stop may be marked down: put it back
    state=$(timeout 10 sinfo -h -o '%t' 2>/dev/null || true)
    case "$state" in down*|drain*) scontrol update nodename="$(hostname)" state=resume 2>/dev/null || true ;; esac
    sleep 1
  done
  echo "slurm_cluster: the node did not become idle in 90 s; logs in $STATE/log" >&2
  tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
  exit 1
}

stop() {
  need_root
  local pid
  for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
    pid=$(cat "$f" 2>/dev/null || true)
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
  done
  echo "slurm_cluster: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) answers && sinfo || { echo "slurm_cluster: no controller answers" >&2; exit 1; } ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
