#!/usr/bin/env bash
# A Debian base image made locally, for machines that cannot pull one (no registry, an air-gapped cluster without a
# registry mirror):
#
#   launch/docker-base.sh IMAGE [SUITE] [MIRROR]          (make docker-base; default debian-local:bookworm)
#
# debootstrap --variant=minbase SUITE into a temporary folder from MIRROR (default: the Debian mirror this machine's
# apt sources name), apt's caches removed, then `tar | docker import`. Bookworm's python3 is 3.11, the Python the
# CPU wheelhouse serves. Needs root and debootstrap (apt-get install -y debootstrap), and a reachable Docker daemon.
set -euo pipefail

IMAGE=${1:?usage: docker-base.sh IMAGE [SUITE] [MIRROR]}
SUITE=${2:-bookworm}
MIRROR=${3:-}

if [ -z "$MIRROR" ]; then  # the first Debian (not -security) mirror of apt's sources, one-line or deb822 style
    MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
             grep -oE '(^deb|^URIs:)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+' |
             grep -oE 'https?://[^[:space:]]+' | grep -v security | head -1 || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi
command -v debootstrap >/dev/null || { echo "docker-base: no debootstrap; apt-get install -y debootstrap" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "docker-base: debootstrap needs root" >&2; exit 1; }
docker version >/dev/null 2>&1 || { echo "docker-base: no Docker daemon reachable (DOCKER_HOST=${DOCKER_HOST:-unset});" \
    "start one: launch/dockerd-private.sh start, then eval \"\$(launch/dockerd-private.sh env)\"" >&2; exit 1; }

root=$(mktemp -d /tmp/docker-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "docker-base: debootstrap --variant=minbase $SUITE from $MIRROR"
debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 || {
    echo "docker-base: debootstrap failed; its log ($root.log) ends:" >&2; tail -n 15 "$root.log" >&2; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' -c 'ENV LANG=C.UTF-8' - "$IMAGE" >/dev/null
echo "docker-base: $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%d MB", $1/1e6}'))"
