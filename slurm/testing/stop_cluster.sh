#!/usr/bin/env bash
# Stop the cluster that start_cluster.sh started from STATE_DIR: the daemons named in its pid
# files (both slurmd, then slurmctld and munged), SIGTERM, then SIGKILL after 10 s. Jobs still
# running on the nodes are killed first.
set -uo pipefail
if [[ $# -ne 1 ]]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi
STATE=$1
export SLURM_CONF=$STATE/slurm.conf
# Running jobs first, so that no training process outlives its slurmd.
if [[ -e $STATE/slurmctld.pid ]] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    scancel --state=PENDING 2>/dev/null || true
    scancel --full --signal=KILL --state=RUNNING 2>/dev/null || true
fi
stop() {  # pid files: TERM all, wait up to 10 s, KILL what is left
    local pids=() f pid
    for f in "$@"; do
        [[ -e $f ]] || continue
        pid=$(cat "$f")
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$f"
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    done
    return 0
}
stop "$STATE/slurmd-n1.pid" "$STATE/slurmd-n2.pid"
stop "$STATE/slurmctld.pid" "$STATE/munged.pid"
exit 0
