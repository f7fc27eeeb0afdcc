#!/usr/bin/env bash
# PID 1 of a container whose training ranks are started by someone else: a Kubernetes MPIJob worker runs sshd and
# the launcher's horovodrun starts the ranks over ssh. Kubernetes (pod deletion, eviction, preemption) and
# `docker stop` send SIGTERM to PID 1 alone and SIGKILL every process of the container when the grace period ends;
# sshd would simply exit and take the ranks with it, no checkpoint. This script runs COMMAND, and on SIGTERM,
# SIGINT or SIGUSR1 forwards that signal to the ranks below it (its descendants with HOROVOD_RANK in their
# environment), waits until they have exited (every rank stops after the same step; rank 0 checkpoints first), and
# only then stops COMMAND.
#
#   command: ["bash", "launch/forward-stop.sh", "/usr/sbin/sshd", "-De"]
set -uo pipefail

ranks() {  # this script's descendants with HOROVOD_RANK in their environment: the training processes
    local -A parent=()
    local stat pid rest p
    local -a fields
    for stat in /proc/[0-9]*/stat; do
        read -r pid rest <"$stat" 2>/dev/null || continue
        read -r -a fields <<<"${rest##*) }"   # after "(command name)": state, ppid, ...
        parent[$pid]=${fields[1]}
    done
    for pid in "${!parent[@]}"; do
        p=$pid
        while [[ $p != "$$" && $p != 1 && -n ${parent[$p]:-} ]]; do p=${parent[$p]}; done
        [[ $p == "$$" && $pid != "$$" ]] || continue
        tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep '^HOROVOD_RANK=' >/dev/null && echo "$pid"
    done
}

stop() {
    local sig=$1 pids
    pids=$(ranks | tr '\n' ' ')
    echo "forward-stop: SIG$sig -> training processes: ${pids:-none}" >&2
    [[ -n $pids ]] && kill -s "$sig" $pids 2>/dev/null
    while [[ -n $(ranks) ]]; do sleep 1; done
    echo "forward-stop: the training processes have exited; stopping the command" >&2
    kill -TERM "$child" 2>/dev/null
}

"$@" &
child=$!
trap 'stop TERM' TERM
trap 'stop INT' INT
trap 'stop USR1' USR1
status=0
while kill -0 "$child" 2>/dev/null; do
    wait "$child" && status=0 || status=$?  # >128 when a trapped signal interrupts wait
done
exit "$status"
