#!/usr/bin/env bash
# A throw-away single-node Slurm cluster on localhost (Debian's slurm-wlm 22.05, run as root), for tests and for
# trying examples/run_grpo_32b.sh without a cluster.
#
#   tools/slurm_local_cluster.sh start DIR [CPUS] [GPUS]   write DIR/slurm.conf, start slurmctld + slurmd, wait until
#                                                          the node is idle; prints `export SLURM_CONF=DIR/slurm.conf`
#   tools/slurm_local_cluster.sh stop DIR                  cancel every job, wait for them, stop both daemons
#
# DIR must be fresh (reused state keeps nodes DRAIN/INVAL). The node advertises CPUS cores (default 8, more than the
# machine may have: SlurmdParameters=config_overrides) and GPUS generic "gpu" resources (default 2; counted only,
# no device files), so `--gpus-per-node` allocations and SLURM_GPUS_ON_NODE behave as on a GPU cluster. No munge:
# AuthType=auth/none. A requeued job is held only ~6 s (cred_expire=5, 1-2 s scheduler intervals).
set -euo pipefail

usage() { echo "usage: $0 start DIR [CPUS] [GPUS] | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
ACTION=$1
DIR=$(mkdir -p "$2" && cd "$2" && pwd)
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start() {
    local cpus=${1:-8} gpus=${2:-2}
    for tool in slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || { echo "$0: $tool not found (apt-get install slurm-wlm)" >&2; exit 3; }
    done
    [ "$(id -u)" = 0 ] || { echo "$0: run as root (slurmd must own the job processes)" >&2; exit 3; }
    [ ! -e "$CONF" ] || { echo "$0: $DIR already holds a cluster; use a fresh directory" >&2; exit 2; }
    mkdir -p "$DIR/state" "$DIR/spool"
    local gres_line=""
    if [ "$gpus" -gt 0 ]; then
        # slurmd only counts a GPU whose device file exists: /dev/null-like nodes stand in for /dev/nvidia*
        for i in $(seq 0 $((gpus - 1))); do mknod "$DIR/fake_gpu$i" c 1 3 2>/dev/null || : > "$DIR/fake_gpu$i"; done
        echo "NodeName=n1 Name=gpu File=$DIR/fake_gpu[0-$((gpus - 1))]" > "$DIR/gres.conf"
        gres_line="Gres=gpu:$gpus"
    fi
    cat > "$CONF" <<EOF
ClusterName=vlmr1local
SlurmctldHost=localhost
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=bf_interval=1,sched_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
GresTypes=gpu
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$cpus $gres_line State=UNKNOWN
PartitionName=local Nodes=n1 Default=YES MaxTime=INFINITE State=UP
EOF
    slurmctld -f "$CONF"
    slurmd -f "$CONF" -N n1
    local state=""
    for _ in $(seq 1 60); do
        state=$(sinfo -h -n n1 -o %t 2>/dev/null || true)
        [ "$state" = idle ] && { echo "export SLURM_CONF=$CONF"; return 0; }
        sleep 0.5
    done
    echo "$0: node n1 did not become idle (state '${state}'); see $DIR/slurmctld.log and $DIR/slurmd.log" >&2
    stop
    exit 1
}

stop_daemon() {
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    [ -f "$CONF" ] || return 0
    # jobs first: processes of a job whose slurmd is gone live on
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        local jobs
        for _ in $(seq 1 60); do
            jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
            [ -n "${jobs// /}" ] || break
            # shellcheck disable=SC2086
            scancel --quiet $jobs 2>/dev/null || true
            sleep 0.5
        done
    fi
    stop_daemon "$DIR/slurmd.pid"
    stop_daemon "$DIR/slurmctld.pid"
}

case "$ACTION" in
    start) start "${3:-8}" "${4:-2}" ;;
    stop) stop ;;
    *) usage ;;
esac
