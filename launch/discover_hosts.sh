#!/bin/sh
# Host discovery for elastic training (horovodrun --host-discovery-script): print one `host:slots` line per host
# that may run workers now. Horovod calls it about once a second; adding a line adds workers (up to --max-np),
# removing one stops that host's workers. This example reads the list from a file that an operator, a scheduler
# hook or a test rewrites; blank lines and # comments are ignored.
#
#   GLOW_DIST_HOSTS_FILE=/shared/hosts.txt horovodrun -np 2 --min-np 1 --max-np 4 \
#       --host-discovery-script launch/discover_hosts.sh --gloo glow-dist train --config ... dist.elastic=true
#
# A non-zero exit on the first call stops the job; later failures are retried by Horovod.
hosts_file="${GLOW_DIST_HOSTS_FILE:-$(dirname "$0")/hosts.txt}"
if [ ! -r "$hosts_file" ]; then
    echo "discover_hosts.sh: cannot read $hosts_file (set GLOW_DIST_HOSTS_FILE)" >&2
    exit 1
fi
grep -v '^[[:space:]]*\(#\|$\)' "$hosts_file"
exit 0
