#!/usr/bin/env bash
# The build context of docker/Dockerfile as a tar on stdout, with a wheelhouse from anywhere in it, for
# `docker build -f docker/Dockerfile -`:
#
#   launch/docker-context.sh WHEELHOUSE | docker build -f docker/Dockerfile --build-arg WHEELHOUSE=wheelhouse/NAME ... -
#
# (make docker-build GPU_WHEELHOUSE=dir). The wheelhouse goes in as wheelhouse/NAME (NAME: its folder's name, e.g.
# wheelhouse/cu13), next to what the Dockerfile's COPY lines name (read from the Dockerfile, so the two cannot
# drift) and docker/ itself. A directory context would send every wheelhouse of the checkout that .dockerignore lets
# through, GBs each, on every build (the legacy builder sends the whole context each time), and could not take one
# from outside the checkout (/srv/wh/cu13).
set -euo pipefail

HOUSE=${1:?usage: docker-context.sh WHEELHOUSE}
REPO=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$HOUSE/requirements.txt" ] || {
    echo "docker-context: $HOUSE is not a wheelhouse (no requirements.txt); make one with make wheelhouse" >&2; exit 1; }
HOUSE=$(cd "$HOUSE" && pwd)
NAME=$(basename "$HOUSE")

# The sources of COPY lines that read the context (not --from=stage; not ${ARG} ones), relative to the repository;
# each once, and none inside another (launch/x.sh and launch/: tar would store the second copy as a hard link to the
# first, which docker's extraction refuses).
mapfile -t sources < <(awk '$1 == "COPY" && $2 !~ /^--from=/ { for (i = 2; i < NF; i++) if ($i !~ /\$/) print $i }' \
                           "$REPO/docker/Dockerfile" | sort -u |
                       awk '{ for (d in seen) if (index($0, d "/") == 1) next; seen[$0]; print }')
tar -c -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' docker "${sources[@]}" \
    -C "$HOUSE" --transform "s,^\.\(/\|$\),wheelhouse/$NAME\1," .
