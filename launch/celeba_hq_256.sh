#!/usr/bin/env bash
# The paper's CelebA-HQ 256 run: 40 ranks (5 machines x 8 GPUs) started by horovodrun over ssh from this machine.
#
#   HOSTFILE=launch/hostfile NIC=eth0 MLFLOW_TRACKING_URI=http://mlflow-host:5000 launch/celeba_hq_256.sh
#   launch/celeba_hq_256.sh train.steps=2000          # extra arguments are config overrides
#   DRY_RUN=1 launch/celeba_hq_256.sh                 # print the command instead of running it
#
# Every machine needs the same checkout and venv at the same path (this repo, `make install horovod` with a CUDA
# torch, or the Docker image), passwordless ssh between machines, and RUN_DIR on shared storage (rank 0 writes
# checkpoints there). DATA is a folder every machine sees, or s3://bucket/prefix (or https://...): each machine then
# copies the shards once into its own cache (data.cache_dir) before the first step. Export AWS_ENDPOINT_URL and
# AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with ~/.aws on every host) here: horovodrun exports them,
# the secret ones over ssh's channel, never on a command line (docs/data.md, "S3 settings and credentials").
set -euo pipefail
cd "$(dirname "$0")/.."

HOSTFILE=${HOSTFILE:-launch/hostfile}          # "host slots=8" lines; see launch/hostfile.example
NP=${NP:-40}                                   # total ranks = sum of slots
NIC=${NIC:-eth0}                               # interface the ranks talk over (ib0, ens5, ...): Gloo and NCCL
START_TIMEOUT=${START_TIMEOUT:-300}            # seconds for ssh checks and starting every rank
SSH_PORT=${SSH_PORT:-22}
CONFIG=${CONFIG:-configs/celeba_hq_256.yaml}
DATA=${DATA:-data/celeba_hq_256}               # `glow-dist prepare folder ... --out $DATA`; a folder or s3://
RUN_DIR=${RUN_DIR:-runs/celeba_hq_256}         # checkpoints; `train.resume=auto` continues from here
MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI to the tracking server (launch/mlflow-server.sh)}
BIN=${BIN:-$PWD/.venv/bin}                     # where horovodrun and glow-dist live on every machine
# Elastic runs (dist.elastic=true): a host discovery script (`host:slots` lines) instead of HOSTFILE; the job goes on
# while at least MIN_NP ranks are left (docs/failures.md, "Elastic training").
HOST_DISCOVERY=${HOST_DISCOVERY:-}
MIN_NP=${MIN_NP:-1}

# NCCL carries the all-reduce; pin it to the same interface Horovod's Gloo controller uses.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$NIC}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export MLFLOW_TRACKING_URI PATH="$BIN:$PATH"

# --gloo: our Horovod build has no MPI (launch/install-horovod.sh); horovodrun exports this environment to every rank.
# glow-dist-horovodrun is horovodrun with stop signals forwarded to the ranks, so a SIGTERM ends in a checkpoint
# rather than horovodrun's SIGKILL 5 s later (glow_dist/distributed/launcher.py; docs/stopping.md).
# LAUNCHER=srun, inside a Slurm job only (launch/slurm/celeba_hq_256.sbatch): srun starts the ranks on the job's
# nodes, no ssh; glow-dist-srun brings up Horovod's Gloo rendezvous for them (glow_dist/distributed/srun.py).
LAUNCHER=${LAUNCHER:-ssh}
# LAUNCHER=srun-mpi: the same with `srun --mpi=pmix` and Horovod's MPI controller (a Horovod built with MPI in BIN).
if [[ $LAUNCHER == srun || $LAUNCHER == srun-mpi ]]; then
    launch=(glow-dist-srun -np "$NP" --network-interface "$NIC" --start-timeout "$START_TIMEOUT"
            --srun-args "${SRUN_ARGS:-}")
    [[ $LAUNCHER == srun ]] || launch+=(--mpi pmix)
elif [[ -n $HOST_DISCOVERY ]]; then
    launch=(glow-dist-horovodrun -np "$NP" --host-discovery-script "$HOST_DISCOVERY" --min-np "$MIN_NP"
            --max-np "$NP" --gloo --network-interfaces "$NIC" --start-timeout "$START_TIMEOUT" -p "$SSH_PORT")
else
    launch=(glow-dist-horovodrun -np "$NP" --hostfile "$HOSTFILE" --gloo --network-interfaces "$NIC"
            --start-timeout "$START_TIMEOUT" -p "$SSH_PORT")
fi
# The ranks find the tracking server in $MLFLOW_TRACKING_URI (exported above), not in a tracking.uri argument: a URI
# may hold a password (http://user:password@host), and glow-dist-horovodrun keeps secrets off every command line,
# sending them to the ranks over ssh's channel (docs/security.md). Credentials: MLFLOW_TRACKING_USERNAME and
# MLFLOW_TRACKING_PASSWORD in this environment, or ~/.mlflow/credentials on every host.
cmd=("${launch[@]}"
     glow-dist train --config "$CONFIG" "data.root=$DATA" "train.run_dir=$RUN_DIR" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
[[ $LAUNCHER == srun* || -n $HOST_DISCOVERY || -f $HOSTFILE ]] || {
    echo "no hostfile $HOSTFILE: copy launch/hostfile.example and list your machines" >&2; exit 2; }
exec "${cmd[@]}"
