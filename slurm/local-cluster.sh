#!/usr/bin/env bash
# A real single-node Slurm on this machine, for tests and for trying `ndde submit`.
#   slurm/local-cluster.sh start    install slurm-wlm + munge if missing (needs root), write a
#                                   minimal slurm.conf, start munged, slurmctld, slurmd, wait for idle
#   slurm/local-cluster.sh stop     end every daemon this script started (by its pid file)
#   slurm/local-cluster.sh status   sinfo / squeue
# No cgroups: proctrack/linuxproc and task/none. The node claims NDDE_SLURM_CPUS CPUs
# (default 8, more than the machine has: SlurmdParameters=config_overrides) so a few small
# jobs run at once; DefMemPerCPU keeps one job from taking all memory.
set -euo pipefail

STATE=${NDDE_SLURM_STATE:-/var/tmp/ndde-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by ndde slurm/local-cluster.sh"
CPUS=${NDDE_SLURM_CPUS:-8}
HOST=$(hostname -s)

die() { echo "local-cluster: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are missing and installing them needs root"
    echo "local-cluster: installing slurm-wlm and munge (Debian packages)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
    }
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -q "^$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
    local mem
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    cat > "$CONF" <<CONF
$MARK
ClusterName=ndde-local
SlurmctldHost=$HOST
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
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=512
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerParameters=defer_batch
MinJobAge=600
KillWait=10
NodeName=$HOST CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }  # the daemon may remove its pid file meanwhile

start() {
    install_packages
    write_conf
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
    alive "$STATE/slurmctld.pid" || slurmctld
    alive "$STATE/slurmd.pid" || slurmd
    for _ in $(seq 1 120); do
        state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1 || true)
        case "$state" in
            idle|mixed|allocated) echo "local-cluster: node $HOST $state"; return 0 ;;
            down*|drain*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node did not become idle in 60 s; see $STATE/log/"
}

stop() {
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
        if alive "$pidfile"; then
            kill "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
            for _ in $(seq 1 50); do alive "$pidfile" || break; sleep 0.1; done
        fi
    done
    echo "local-cluster: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo; squeue ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
