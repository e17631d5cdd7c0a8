#!/bin/bash
# Data-parallel training across nodes under Slurm.
#   sbatch multinode/slurm.sh [more run_libe_cnn.py options]
# Rank 0 runs the libEnsemble manager, the parent-model generator and a private Redis
# server; ranks 1..N are the workers. N = nodes x tasks per node - 1.
#
# ---- parameters to set (everything marked CHANGE_ME) -------------------------------
#SBATCH --job-name=libe-cnn
#SBATCH --account=CHANGE_ME                # your allocation
#SBATCH --partition=CHANGE_ME              # your queue
#SBATCH --nodes=2                          # nodes
#SBATCH --ntasks-per-node=4                # ranks per node: one per GPU, or per 2-8 cores
#SBATCH --cpus-per-task=8                  # cores per rank (threads per worker)
#SBATCH --time=01:00:00
# #SBATCH --gpus-per-node=4                # on GPU nodes: workers pick GPU = local rank % GPUs
# ------------------------------------------------------------------------------------
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
# module load openmpi                     # CHANGE_ME: your site's MPI, if it is a module

# The environment: .venv (make setup-mpi) or pixi's (PIXI_ENV); sets PYTHON.
source multinode/environment.sh

# Staged before the job (compute nodes often have no internet), e.g. on a login node:
#   .venv/bin/libe-cnn fetch fashion-mnist --data-dir DATA_DIR
DATA_DIR=${DATA_DIR:-data}                 # DATA_DIR/FashionMNIST/raw/*
REDIS_PORT=${REDIS_PORT:-6380}             # must be open from every node to the first node

export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# --redis-bind 0.0.0.0: the private server listens on every interface of the first node,
# with a random password that travels to the workers inside libEnsemble's messages only.
srun --mpi=pmix --ntasks="$SLURM_NTASKS" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "$PYTHON" run_libe_cnn.py --comms mpi \
    --redis-bind 0.0.0.0 --redis-port "$REDIS_PORT" \
    --dataset fashion-mnist --data-dir "$DATA_DIR" \
    "$@"
