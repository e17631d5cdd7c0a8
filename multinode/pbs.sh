#!/bin/bash
# Data-parallel training across nodes under PBS Pro / OpenPBS.
#   qsub multinode/pbs.sh          (pass options with: qsub -v ARGS="--epochs 3" ...)
# Rank 0 runs the libEnsemble manager, the parent-model generator and a private Redis
# server; ranks 1..N are the workers. N = nodes x ranks per node - 1.
#
# ---- parameters to set (everything marked CHANGE_ME) -------------------------------
#PBS -N libe-cnn
#PBS -A CHANGE_ME                          # your allocation
#PBS -q CHANGE_ME                          # your queue
#PBS -l select=2:ncpus=32:mpiprocs=4       # 2 nodes, 4 ranks each
#PBS -l walltime=01:00:00
#PBS -j oe
# ------------------------------------------------------------------------------------
set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"
# module load openmpi                     # CHANGE_ME: your site's MPI, if it is a module

# The environment: .venv (make setup-mpi) or pixi's (PIXI_ENV); sets PYTHON.
source multinode/environment.sh

# Staged before the job (compute nodes often have no internet), e.g. on a login node:
#   .venv/bin/libe-cnn fetch fashion-mnist --data-dir DATA_DIR
DATA_DIR=${DATA_DIR:-data}                 # DATA_DIR/FashionMNIST/raw/*
REDIS_PORT=${REDIS_PORT:-6380}             # must be open from every node to the first node
RANKS=$(wc -l < "$PBS_NODEFILE")           # one line per MPI rank (mpiprocs)
THREADS=${THREADS:-8}                      # cores per rank

export OMP_NUM_THREADS=$THREADS

mpiexec -n "$RANKS" --hostfile "$PBS_NODEFILE" \
    "$PYTHON" run_libe_cnn.py --comms mpi \
    --redis-bind 0.0.0.0 --redis-port "$REDIS_PORT" \
    --dataset fashion-mnist --data-dir "$DATA_DIR" \
    ${ARGS:-}
