#!/bin/bash
# Multi-node training under SLURM: one task per node, torchrun inside starts one process per GPU.
#
#   sbatch --nodes=2 --gpus-per-node=8 scripts/slurm_train.sh train_cifar10.py --model=otcfm --output_dir=./results/
#
# The first argument is the training script, the rest its flags. --resume=auto is added, so the
# first launch starts fresh and every requeue continues from the newest good checkpoint.
# Pre-emption: SLURM sends SIGUSR1 to this batch shell 120 s before the time limit
# (--signal=B:USR1@120); the trap forwards SIGTERM to srun, which passes it to torchrun and on to
# the workers; they finish the current step, write a checkpoint, exit 0, and the job is requeued.
#SBATCH --job-name=cifar10-fm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
script=${1:?usage: sbatch scripts/slurm_train.sh TRAIN_SCRIPT [FLAGS...]}
shift
gpus_per_node=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=${MASTER_PORT:-29500}

requeue() {
    echo "$(date): pre-emption signal: asking the workers to checkpoint, then requeueing job $SLURM_JOB_ID"
    kill -TERM "$srun_pid"     # srun forwards it to torchrun, torchrun to the workers
    wait "$srun_pid"
    scontrol requeue "$SLURM_JOB_ID"
}
# Each node's torchrun meets the others at the first node (c10d rendezvous); the world size is
# nodes x GPUs per node and nothing in the maths depends on it (see README, "Many GPUs and nodes").
srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$gpus_per_node" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head_node:$port" \
    "$script" --resume=auto "$@" &
srun_pid=$!
trap requeue USR1
wait "$srun_pid"
