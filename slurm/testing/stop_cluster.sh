#!/usr/bin/env bash
# Stop the cluster that start_cluster.sh started from STATE_DIR: the daemons named in its pid
# files (slurmd n2, n1, slurmctld, munged), SIGTERM, then SIGKILL after 10 s. Jobs still
# running on the nodes are killed with them.
set -uo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi
STATE=$1
export SLURM_CONF=$STATE/slurm.conf
# Running jobs first, so that no training process outlives its slurmd.
if [[ -e $STATE/slurmctld.pid ]] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    scancel --full --signal=KILL --state=RUNNING 2>/dev/null || true
    scancel 2>/dev/null || true
fi
stop() {  # pid file
    [[ -e $1 ]] || return 0
    local pid
    pid=$(cat "$1")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$1"
}
stop "$STATE/slurmd-n2.pid"
stop "$STATE/slurmd-n1.pid"
stop "$STATE/slurmctld.pid"
stop "$STATE/munged.pid"
exit 0
