#!/bin/sh
# Host discovery for elastic runs under Slurm (launch/slurm/celeba_hq_256.sbatch with ELASTIC=1): one
# `node:GPUS_PER_NODE` line for each node of this job that Slurm reports responding and neither down, drained nor
# failing. horovodrun calls it about once a second; a node that drops out of the list stops its ranks, one that
# comes back gets them again (up to --max-np). A node that dies between two of Slurm's pings (SlurmdTimeout) is
# still listed: horovodrun then fails to start its ranks over ssh and blacklists it.
set -eu
: "${SLURM_JOB_NODELIST:?discover_hosts.sh runs inside a Slurm job (SLURM_JOB_NODELIST is not set)}"
: "${GPUS_PER_NODE:?set GPUS_PER_NODE (ranks per node)}"
# %t: the node state, with a suffix when not responding (*), powering (~#%) or failing (!); once per partition.
sinfo -h -N -n "$SLURM_JOB_NODELIST" -o '%N %t' |
    awk -v slots="$GPUS_PER_NODE" '$2 !~ /[*~#%!]|down|drain|fail/ && !seen[$1]++ { print $1 ":" slots }'
