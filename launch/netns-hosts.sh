#!/usr/bin/env bash
# Two "hosts" on one machine, for tests/test_multihost.py and the local Slurm cluster (launch/slurm/local-cluster.sh):
# network namespaces glowA-TAG and glowB-TAG joined by a veth pair (10.200.0.1/24 <-> 10.200.0.2/24, an address
# range that exists only inside these namespaces, so no traffic leaves them), each running its own sshd on port 2222
# with a generated host key and a root key. Each namespace also gets its own UTS hostname (hostA / hostB) and
# /etc/hosts (via /etc/netns/NS/hosts, which `ip netns exec` bind-mounts), so `horovodrun -H hostA:1,hostB:1` sees
# two machines.
#
#   netns-hosts.sh up DIR TAG     # exit 77: this machine cannot host the test (reason on stderr)
#   netns-hosts.sh sshd DIR hostA # exec sshd -D inside hostA (the caller keeps and stops the process)
#   netns-hosts.sh wait DIR       # until `ssh hostA` and `ssh hostB` work from hostA (exit 1 after 20 s)
#   netns-hosts.sh run DIR CMD... # run CMD as hostA, with the ssh wrapper first in PATH
#   netns-hosts.sh down DIR       # stop both sshd, delete the namespaces; safe to call twice
#   netns-hosts.sh need DIR FILE:PACKAGE...  # apt-get install each PACKAGE whose FILE is missing (exit 77 if it can't)
set -euo pipefail
action=$1 dir=$2
PORT=2222

cant() { echo "multihost: $*" >&2; exit 77; }

# Installs the packages whose files are missing (arguments FILE:PACKAGE), or says why it cannot (exit 77).
need() {
    local item missing=()
    for item in "$@"; do [[ -x ${item%%:*} ]] || missing+=("${item#*:}"); done
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || cant "${missing[*]} missing; installing them needs root"
    command -v apt-get >/dev/null || cant "${missing[*]} missing and no apt-get to install them"
    # Quiet, non-interactive; `update` only when the package lists are empty (a fresh container). The lock timeout:
    # another install on the machine finishes first.
    compgen -G "/var/lib/apt/lists/*Packages*" >/dev/null || apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends \
        "${missing[@]}" >/dev/null || cant "apt-get install ${missing[*]} failed"
}

up() {
    local tag=$1
    [[ $(id -u) == 0 ]] || cant "needs root (network namespaces and sshd)"
    need /bin/ip:iproute2 /usr/sbin/sshd:openssh-server /usr/bin/ssh-keygen:openssh-client
    local A=glowA-$tag B=glowB-$tag
    ip netns add "$A" 2>"$dir/netns.err" || cant "cannot create network namespaces: $(cat "$dir/netns.err")"
    echo "$A" >"$dir/namespaces"
    ip netns add "$B"
    echo "$B" >>"$dir/namespaces"
    # veth names are global until moved, so they carry the tag; inside each namespace both are called gd0.
    ip link add "gdA$tag" type veth peer name "gdB$tag"
    ip link set "gdA$tag" netns "$A"
    ip link set "gdB$tag" netns "$B"
    local i=1 ns
    for ns in "$A" "$B"; do
        ip -n "$ns" link set "gd${ns:4:1}$tag" name gd0
        ip -n "$ns" addr add "10.200.0.$i/24" dev gd0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set gd0 up
        mkdir -p "/etc/netns/$ns"
        { cat /etc/hosts; printf '10.200.0.1 hostA\n10.200.0.2 hostB\n'; } >"/etc/netns/$ns/hosts"
        i=$((i + 1))
    done

    ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$dir/id_ed25519"
    cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
    mkdir -p /run/sshd   # sshd's privilege-separation directory
    i=1
    for ns in "$A" "$B"; do
        local name=host${ns:4:1}
        cat >"$dir/sshd_$name.conf" <<CONF
Port $PORT
ListenAddress 10.200.0.$i
HostKey $dir/host_key
PidFile $dir/sshd_$name.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
CONF
        i=$((i + 1))
    done

    # horovodrun calls plain `ssh`; the wrapper points it at our config, so root's ~/.ssh is never touched.
    cat >"$dir/ssh_config" <<CONF
Host hostA hostB 10.200.0.*
    User root
    Port $PORT
    IdentityFile $dir/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile /dev/null
    StrictHostKeyChecking no
    LogLevel ERROR
    ConnectTimeout 10
CONF
    mkdir -p "$dir/bin"
    printf '#!/bin/sh\nexec /usr/bin/ssh -F %s "$@"\n' "$dir/ssh_config" >"$dir/bin/ssh"
    chmod +x "$dir/bin/ssh"

    echo "multihost: namespaces $A and $B ready; start sshd in each with: $0 sshd DIR hostA|hostB"
}

# sshd in the foreground (-D) as hostA or hostB: the caller owns the process, stops it and reaps it.
sshd() {
    local name=$1 ns
    ns=$(sed -n "$([[ $name == hostA ]] && echo 1 || echo 2)p" "$dir/namespaces")
    exec ip netns exec "$ns" unshare --uts sh -c "hostname $name; exec /usr/sbin/sshd -D -f $dir/sshd_$name.conf -E $dir/sshd_$name.log"
}

wait_ssh() {
    for _ in $(seq 100); do
        if [[ $(run ssh hostB hostname 2>/dev/null) == hostB && $(run ssh hostA hostname 2>/dev/null) == hostA ]]; then
            echo "multihost: ssh hostA -> hostA, hostB works"; return 0
        fi
        sleep 0.2
    done
    echo "multihost: ssh from hostA does not work; sshd logs:" >&2
    cat "$dir"/sshd_*.log >&2 || true
    exit 1
}

run() {
    local A
    A=$(head -1 "$dir/namespaces")
    ip netns exec "$A" unshare --uts env PATH="$dir/bin:$PATH" sh -c 'hostname hostA; exec "$@"' sh "$@"
}

down() {
    local pidfile ns
    for pidfile in "$dir"/sshd_*.pid; do
        # Only a pid that is still our sshd (its command line names our config): pids get reused.
        [[ -f $pidfile ]] && grep -qs "$dir/sshd_" "/proc/$(cat "$pidfile")/cmdline" \
            && kill "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
    if [[ -f $dir/namespaces ]]; then
        while read -r ns; do
            ip netns del "$ns" 2>/dev/null || true   # also removes the veth pair
            rm -rf "/etc/netns/$ns"
        done <"$dir/namespaces"
        rm -f "$dir/namespaces"
        rmdir /etc/netns 2>/dev/null || true   # only if empty: other namespaces may keep files there
    fi
}

case $action in
    up) up "$3" ;;
    sshd) sshd "$3" ;;
    wait) wait_ssh ;;
    run) shift 2; run "$@" ;;
    down) down ;;
    need) shift 2; need "$@" ;;
    *) echo "usage: $0 up DIR TAG | sshd DIR hostA|hostB | wait DIR | run DIR CMD... | down DIR | need DIR FILE:PKG..." >&2
       exit 2 ;;
esac
