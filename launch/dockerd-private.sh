#!/usr/bin/env bash
# A private Docker engine for machines without systemd (containers, CI VMs), as root:
#
#   launch/dockerd-private.sh start     # dockerd with its own data-root, exec-root, pidfile and socket
#   eval "$(launch/dockerd-private.sh env)"    # DOCKER_HOST=unix://... for the docker client (make docker-train)
#   launch/dockerd-private.sh stop      # SIGTERM by pid, then unmount what it left (netns/default, overlays)
#   launch/dockerd-private.sh status
#   launch/dockerd-private.sh sock      # the socket's path (the Makefile uses it when DOCKER_HOST is unset)
#
# Everything lives under $GLOW_DIST_DOCKER_ROOT (default ~/.cache/glow-dist/docker): data/ (images, layer cache, kept
# between starts), exec/, dockerd.pid, dockerd.sock, dockerd.log. The tests use their own root
# (~/.cache/glow-dist/docker-test), so they never stop a daemon a user started.
# The engine runs without a bridge and without iptables (neither works in most unprivileged VMs): build steps and
# containers use the host's network (`docker build --network host`, `docker run --network host`), as the Makefile does.
# overlay2 storage; vfs works too but is about 2x slower and 3x larger. Needs dockerd: apt-get install docker.io.
set -euo pipefail

ROOT=${GLOW_DIST_DOCKER_ROOT:-$HOME/.cache/glow-dist/docker}
SOCK=$ROOT/dockerd.sock
PIDFILE=$ROOT/dockerd.pid
LOG=$ROOT/dockerd.log
START_TIMEOUT=${GLOW_DIST_DOCKERD_START_TIMEOUT:-90}

running_pid() {
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = dockerd ] && echo "$pid"
}

# Mount points under ROOT, deepest first (overlays of containers inside the data-root, netns/default).
mounts_under_root() {
    awk -v root="$ROOT/" 'index($5, root) == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

start() {
    if pid=$(running_pid); then
        echo "dockerd-private: already running (pid $pid, DOCKER_HOST=unix://$SOCK)"
        return 0
    fi
    [ "$(id -u)" = 0 ] || { echo "dockerd-private: dockerd needs root here (run as root, or use the machine's own" \
                                 "Docker service)" >&2; exit 1; }
    command -v dockerd >/dev/null || { echo "dockerd-private: no dockerd on PATH; install it:" \
                                            "apt-get install -y docker.io" >&2; exit 1; }
    # A unix socket path must fit in 108 bytes.
    [ ${#SOCK} -lt 100 ] || { echo "dockerd-private: socket path $SOCK is too long; set a shorter" \
                                   "GLOW_DIST_DOCKER_ROOT" >&2; exit 1; }
    mkdir -p "$ROOT/data" "$ROOT/exec"
    rm -f "$SOCK"
    setsid dockerd --storage-driver=overlay2 --iptables=false --ip6tables=false --bridge=none \
        --data-root "$ROOT/data" --exec-root "$ROOT/exec" --pidfile "$PIDFILE" -H "unix://$SOCK" \
        </dev/null >"$LOG" 2>&1 &
    local launched=$! waited=0
    until DOCKER_HOST=unix://$SOCK docker version >/dev/null 2>&1; do
        if ! kill -0 "$launched" 2>/dev/null; then
            echo "dockerd-private: dockerd exited at start; its log ($LOG) ends:" >&2
            tail -n 15 "$LOG" >&2
            exit 1
        fi
        if [ "$waited" -ge "$START_TIMEOUT" ]; then
            echo "dockerd-private: dockerd (pid $launched) did not answer on $SOCK within ${START_TIMEOUT}s;" \
                 "stopping it. Its log: $LOG" >&2
            stop >&2
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    echo "dockerd-private: started (pid $launched, storage $(DOCKER_HOST=unix://$SOCK docker info \
        --format '{{.Driver}}'), data-root $ROOT/data)"
    echo "dockerd-private: for the docker client: export DOCKER_HOST=unix://$SOCK"
}

stop() {
    local pid waited=0
    if pid=$(running_pid); then
        kill -TERM "$pid"
        while kill -0 "$pid" 2>/dev/null; do
            if [ "$waited" -ge 60 ]; then
                echo "dockerd-private: dockerd (pid $pid) ignored SIGTERM for 60 s; SIGKILL" >&2
                kill -KILL "$pid" 2>/dev/null || true
            fi
            sleep 1
            waited=$((waited + 1))
        done
        echo "dockerd-private: stopped (pid $pid)"
    else
        echo "dockerd-private: not running (no live dockerd in $PIDFILE)"
    fi
    # dockerd leaves its network namespace bind-mounted (exec-root/netns/default), and a killed one its overlays.
    local m
    while read -r m; do
        [ -n "$m" ] && umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done < <(mounts_under_root)
    rm -f "$PIDFILE" "$SOCK"
    if [ -n "$(mounts_under_root)" ]; then
        echo "dockerd-private: still mounted under $ROOT:" >&2
        mounts_under_root >&2
        exit 1
    fi
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    env) echo "export DOCKER_HOST=unix://$SOCK" ;;
    sock) echo "$SOCK" ;;
    status)
        if pid=$(running_pid); then echo "dockerd-private: running (pid $pid, DOCKER_HOST=unix://$SOCK)"
        else echo "dockerd-private: not running (start it: $0 start)"; exit 3; fi ;;
    *) echo "usage: $0 start|stop|env|sock|status   (root: $ROOT)" >&2; exit 2 ;;
esac
