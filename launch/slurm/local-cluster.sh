#!/usr/bin/env bash
# A real two-node Slurm 22.05 cluster on one machine, to try the launch files and to test them (tests/test_slurm.py):
# munged, slurmctld and two slurmd (nodes hostA and hostB), each node a network namespace with its own address and
# sshd (launch/netns-hosts.sh), so that horovodrun reaches the second node over ssh exactly as on a cluster.
# Debian's slurm-wlm and munge, installed if missing; as root, without systemd or cgroups.
#
#   launch/slurm/local-cluster.sh start [DIR]    # up in a few seconds; prints the environment clients need
#   eval "$(launch/slurm/local-cluster.sh env [DIR])"
#   sbatch --nodes=2 ... ; squeue ; scontrol show job N
#   launch/slurm/local-cluster.sh status [DIR]
#   launch/slurm/local-cluster.sh node-kill [DIR] hostB   # the node dies: slurmd, sshd and every job process on it
#   launch/slurm/local-cluster.sh node-start [DIR] hostB  # it comes back (sshd, slurmd)
#   launch/slurm/local-cluster.sh stop [DIR]     # cancels the jobs, stops every daemon, removes the namespaces
#   SSHD=0 launch/slurm/local-cluster.sh start [DIR]   # the nodes without sshd (the sbatch script's LAUNCHER=srun)
#
# DIR (default /tmp/glow-slurm) holds slurm.conf, munge's key and socket, the daemons' logs and state, and the ssh
# key and wrapper. Exit 77: this machine cannot run it (not root, no namespaces, packages not installable).
# Root trusts what DIR holds (it runs munged with that key, the daemons with that slurm.conf, and copies lines into
# /etc/hosts), so DIR must be root's alone: it is made 0700 when absent, and one that another user owns or could write
# (or could replace: a folder above it that is not root's, or writable by others without the sticky bit, as /tmp
# has) is refused in one line, exit 2 (trusted_dir).
#
# Topology. hostA and hostB talk over their own link (eth0 is not used: gd0, 10.200.0.1-2, named in /etc/hosts), as
# the ranks do. The controller runs in this (the root) namespace at 10.201.9.1 ("glow-slurmctld"), reached by each
# node over a second link (ctl0: 10.201.1.1 <-> 10.201.1.254, 10.201.2.1 <-> 10.201.2.254) and by clients here.
# Nothing is forwarded between links, so no firewall rule matters. Daemons inside a node are started with
# `nsenter --net` (not `ip netns exec`, which remounts /sys and breaks slurmd) and their own UTS namespace (hostname).
#
# Settings for quick tests, documented in docs/cluster/slurm.md ("The local cluster's settings"): AuthInfo cred_expire=10 and
# SchedulerParameters=bf_interval=1,sched_interval=2 (a requeued job runs again after about 17 s, not 2 minutes),
# KillWait=$KILL_WAIT (default 30, Slurm's), SlurmdTimeout=$SLURMD_TIMEOUT (10: a lost node is DOWN within about
# 15 s). Partitions: `low` (default, preemptible: PreemptMode=REQUEUE) and `high` (PriorityTier 10, never
# preempted); PreemptType=preempt/partition_prio. Each node offers 8 CPUs and 4000 MB (SlurmdParameters=
# config_overrides), so several small jobs can share the nodes; memory (CR_CPU_Memory) is what a preemptor claims.
set -euo pipefail
action=${1:-}
HERE=$(cd "$(dirname "$0")" && pwd)
HOSTS=$HERE/../netns-hosts.sh
NODES=(hostA hostB)
TAG=slurm   # the namespaces glowA-slurm, glowB-slurm
CTL_ADDR=10.201.9.1 CTL_NAME=glow-slurmctld CTL_PORT=16817
KILL_WAIT=${KILL_WAIT:-30}
SLURMD_TIMEOUT=${SLURMD_TIMEOUT:-10}
HOSTS_MARK="# glow-dist local-cluster"

cant() { echo "local-cluster: $*" >&2; exit 77; }
say() { echo "local-cluster: $*" >&2; }

if [[ $action == node-* ]]; then dir=${3:+$2} node=${3:-${2:-}}; else dir=${2:-}; fi
dir=${dir:-/tmp/glow-slurm}
# DIR and every folder above it: root's, and writable by no one else (the folders above may be sticky, as /tmp is),
# so that no other local user planted or can swap what root reads from it. `start` makes DIR (0700) when absent.
trusted_dir() {
    local path real owner mode why=""
    (($(id -u) == 0)) || return 0   # only root's use of DIR is at stake (start says it needs root)
    if [[ ! -e $dir && ! -L $dir && $action == start ]]; then
        mkdir -p "$(dirname "$dir")"
        mkdir -m 0700 "$dir" 2>/dev/null || true   # fails if someone made it meanwhile: checked below like any other
    fi
    [[ -e $dir || -L $dir ]] || return 0   # nothing there: stop, status and env have nothing to trust
    if [[ -L $dir ]]; then
        why="it is a symbolic link"
    elif [[ ! -d $dir ]]; then
        why="it is not a directory"
    else
        real=$(cd "$dir" && pwd -P)
        path=$real
        while :; do
            read -r owner mode < <(stat -c '%u %a' "$path")
            if ((owner != 0)); then
                why="${path} is owned by uid $owner, not root"
            elif ((8#$mode & 8#022)) && { [[ $path == "$real" ]] || ! ((8#$mode & 8#1000)); }; then
                why="${path} is writable by group or others (mode $mode)"
            fi
            [[ -z $why && $path != / ]] || break
            path=$(dirname "$path")
        done
    fi
    [[ -z $why ]] && return 0
    echo "local-cluster: refusing $dir: $why, so another user could have planted munge.key, slurm.conf or the" \
        "/etc/hosts lines that root would use; remove it or pass a folder only root can write: $0 $action /root/glow-slurm" >&2
    exit 2
}
ns_of() { echo "glow${1#host}-$TAG"; }   # hostA -> glowA-slurm
letter() { echo "${1#host}"; }

client_env() {
    echo "export SLURM_CONF=$dir/slurm.conf"
    echo "export PATH=$dir/hosts/bin:\$PATH   # ssh between the nodes (root's ~/.ssh is not touched)"
}

write_conf() {
    local host
    host=$(hostname -s)
    cat >"$dir/slurm.conf" <<CONF
# Written by launch/slurm/local-cluster.sh
ClusterName=glowdist
SlurmctldHost=$host($CTL_ADDR)
SlurmctldPort=$CTL_PORT
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
# Each node's own temporary folder: the nodes share this machine's /tmp, where PMIx (srun --mpi=pmix) would make the
# same /tmp/spmix_appdir_UID_JOB.STEP on both and the second node's step would fail with EEXIST.
TmpFS=$dir/tmp/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=100
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
KillWait=$KILL_WAIT
SlurmdTimeout=$SLURMD_TIMEOUT
ReturnToService=2
MinJobAge=600
SlurmdParameters=config_overrides
NodeName=hostA NodeAddr=10.201.1.1 CPUs=8 RealMemory=4000 State=UNKNOWN
NodeName=hostB NodeAddr=10.201.2.1 CPUs=8 RealMemory=4000 State=UNKNOWN
PartitionName=low Nodes=hostA,hostB Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE
PartitionName=high Nodes=hostA,hostB MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
}

# A daemon in the background, in its own session, its pid in run/NAME.pid (slurmd and slurmctld write their own
# pid files too; ours is the process we started).
spawn() {
    local name=$1
    shift
    setsid "$@" >>"$dir/log/$name.out" 2>&1 </dev/null &
    echo $! >"$dir/run/$name.pid"
}

# --- SSHD=0 (start): the nodes run no sshd, as on sites that forbid ssh between compute nodes; only the sbatch
# script's LAUNCHER=srun can start ranks there. Kept in $dir/no-sshd, so that node-start brings a node back the same.
sshd_wanted() { [[ ! -e $dir/no-sshd ]]; }
# --- end of SSHD=0

start_node() {
    local node=$1 ns
    ns=$(ns_of "$node")
    sshd_wanted && spawn "sshd-$node" bash "$HOSTS" sshd "$dir/hosts" "$node"
    mkdir -p "$dir/spool/$node" "$dir/tmp/$node"
    spawn "slurmd-$node" nsenter "--net=/run/netns/$ns" unshare --uts \
        sh -c "hostname $node; exec env SLURM_CONF=$dir/slurm.conf slurmd -D -N $node -f $dir/slurm.conf"
}

wait_until() {  # wait_until SECONDS WHAT CMD...
    local seconds=$1 what=$2 i
    shift 2
    for ((i = 0; i < seconds * 5; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    say "$what did not happen within $seconds s; logs in $dir/log"
    tail -n 20 "$dir"/log/*.log >&2 || true
    return 1
}

nodes_idle() { [[ $(SLURM_CONF=$dir/slurm.conf sinfo -h -N -p low -o %t | grep -c '^idle$') == 2 ]]; }

start() {
    [[ $(id -u) == 0 ]] || cant "needs root (network namespaces, munged and slurmd as root)"
    [[ ! -e $dir/running ]] || { say "already running in $dir (stop it first: $0 stop $dir)"; exit 1; }
    bash "$HOSTS" need - /usr/sbin/slurmctld:slurmctld /usr/sbin/slurmd:slurmd /usr/bin/sbatch:slurm-client \
        /usr/sbin/munged:munge /usr/bin/nsenter:util-linux
    # A start that fails half-way takes down what it started (exit 77 included: no namespaces, for example).
    trap 'rc=$?; trap - EXIT; if ((rc)); then say "start failed (exit $rc); undoing it"; stop; exit "$rc"; fi' EXIT
    rm -rf "$dir/hosts" "$dir/state" "$dir/spool" "$dir/run" "$dir/log"
    mkdir -p "$dir"/{hosts,state,spool,run,log}
    touch "$dir/running"
    rm -f "$dir/no-sshd"; [[ ${SSHD:-1} == 0 ]] && touch "$dir/no-sshd"   # SSHD=0: see sshd_wanted
    # The hosts, their sshd and the ssh wrapper (exit 77 is passed on).
    bash "$HOSTS" up "$dir/hosts" "$TAG" >/dev/null
    # The controller's links: one veth per node, nothing routed between them.
    local node ns i=1
    for node in "${NODES[@]}"; do
        ns=$(ns_of "$node")
        ip link add "gsl$(letter "$node")" type veth peer name "gsl$(letter "$node")n"
        echo "gsl$(letter "$node")" >>"$dir/links"
        ip link set "gsl$(letter "$node")n" netns "$ns"
        ip -n "$ns" link set "gsl$(letter "$node")n" name ctl0
        ip -n "$ns" addr add "10.201.$i.1/24" dev ctl0
        ip -n "$ns" link set ctl0 up
        ip addr add "10.201.$i.254/24" dev "gsl$(letter "$node")"
        ip link set "gsl$(letter "$node")" up
        ip -n "$ns" route add "$CTL_ADDR/32" via "10.201.$i.254"
        i=$((i + 1))
    done
    ip addr add "$CTL_ADDR/32" dev gslA
    # srun (the sbatch script's LAUNCHER=srun) on one node talks to the other node's slurmd at its NodeAddr, a ctl0
    # address, and that slurmd answers srun over gd0: each node reaches the other's ctl0 address over gd0 (a local
    # address of the peer, so still nothing forwarded).
    ip -n "$(ns_of hostA)" route add 10.201.2.1/32 via 10.200.0.2 dev gd0
    ip -n "$(ns_of hostB)" route add 10.201.1.1/32 via 10.200.0.1 dev gd0
    # Node names resolve everywhere (nsenter keeps this /etc/hosts): the job's `scontrol show hostnames` feeds
    # horovodrun's hostfile.
    printf '10.200.0.1 hostA %s\n10.200.0.2 hostB %s\n%s %s %s\n' "$HOSTS_MARK" "$HOSTS_MARK" "$CTL_ADDR" \
        "$CTL_NAME" "$HOSTS_MARK" >>/etc/hosts

    # munged with its own key, socket, pid, seed and log; the socket's directory must be 0711.
    mkdir -p "$dir/munge"
    chmod 0711 "$dir/munge"
    mungekey -c -f -k "$dir/munge/munge.key"
    spawn munged munged -F --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket.2" \
        --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed" --log-file="$dir/log/munged.log"
    wait_until 10 "munged's socket" test -S "$dir/munge/munge.socket.2"

    write_conf
    export SLURM_CONF=$dir/slurm.conf
    spawn slurmctld slurmctld -D -i -f "$dir/slurm.conf"
    wait_until 20 "slurmctld answering" scontrol ping
    for node in "${NODES[@]}"; do start_node "$node"; done
    if sshd_wanted; then bash "$HOSTS" wait "$dir/hosts" >/dev/null; fi
    wait_until 30 "both nodes idle" nodes_idle
    trap - EXIT
    say "up in $dir: partitions low (default, preemptible) and high; nodes hostA, hostB. Clients need:"
    client_env
}

pid_of() { local f=$dir/run/$1.pid; [[ -f $f ]] && cat "$f"; }

stop_pid() {  # a daemon we started, by its pid (only while its pid file is ours)
    local pid
    pid=$(pid_of "$1") || return 0
    [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/run/$1.pid"
}

# Every process inside a node's namespace: its slurmd, the slurmstepd that outlive slurmd, job processes, sshd and
# what ssh started there.
kill_node_processes() {
    local ns pids
    ns=$(ns_of "$1")
    [[ -e /run/netns/$ns ]] || return 0
    for _ in 1 2 3; do
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        [[ -n $pids ]] || return 0
        kill -9 $pids 2>/dev/null || true
        sleep 0.3
    done
}

node_kill() {
    [[ -n $node ]] || { say "usage: $0 node-kill [DIR] hostA|hostB"; exit 2; }
    kill_node_processes "$node"
    rm -f "$dir/run/slurmd-$node.pid" "$dir/run/sshd-$node.pid"
    say "$node is gone: slurmd, sshd and every process on it killed"
}

node_start() {
    [[ -n $node ]] || { say "usage: $0 node-start [DIR] hostA|hostB"; exit 2; }
    export SLURM_CONF=$dir/slurm.conf
    start_node "$node"
    wait_until 30 "$node responding" sh -c "sinfo -h -n $node -o %t | grep -qv '[*]'"
    say "$node is back"
}

stop() {
    export SLURM_CONF=$dir/slurm.conf
    if [[ -f $dir/slurm.conf ]] && scontrol ping >/dev/null 2>&1; then
        # Jobs first: their slurmstepd would outlive slurmd.
        scancel --full --quiet $(squeue -h -o %i) 2>/dev/null || true
        wait_until 20 "every job gone" sh -c '[ -z "$(squeue -h -t running,completing -o %i)" ]' || true
    fi
    local node
    for node in "${NODES[@]}"; do kill_node_processes "$node"; done
    stop_pid slurmctld
    stop_pid munged
    for node in "${NODES[@]}"; do rm -f "$dir/run/slurmd-$node.pid" "$dir/run/sshd-$node.pid"; done
    if [[ -f $dir/links ]]; then
        while read -r link; do ip link del "$link" 2>/dev/null || true; done <"$dir/links"
        rm -f "$dir/links"
    fi
    [[ -d $dir/hosts ]] && bash "$HOSTS" down "$dir/hosts"
    if grep -q "$HOSTS_MARK" /etc/hosts; then
        # In place (not a rename): /etc/hosts may be a bind mount.
        grep -v "$HOSTS_MARK" /etc/hosts >"$dir/hosts.new" || true
        cat "$dir/hosts.new" >/etc/hosts
        rm -f "$dir/hosts.new"
    fi
    rm -f "$dir/running"
    say "stopped; $dir kept (logs)"
}

status() {
    export SLURM_CONF=$dir/slurm.conf
    [[ -e $dir/running ]] || { echo "not running ($dir)"; exit 3; }
    scontrol ping
    sinfo
    squeue
}

case $action in start | stop | status | env | node-kill | node-start) trusted_dir ;; esac
case $action in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) client_env ;;
    node-kill) node_kill ;;
    node-start) node_start ;;
    *) echo "usage: $0 start|stop|status|env [DIR] | node-kill|node-start [DIR] hostA|hostB" >&2; exit 2 ;;
esac
