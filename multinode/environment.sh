# Sourced by the job scripts from the repository's root: the Python every rank runs, in PYTHON.
# The environment (multinode/README.md), on a shared file system:
#  - .venv with mpi4py: `make setup-mpi`, which does nothing once it is installed (run it on a
#    login node first if the compute nodes have no internet);
#  - or pixi's, named by PIXI_ENV (site-mpich, site-openmpi or default): activated here, so that
#    its python and redis-server are on the PATH every rank inherits.
if [ -n "${PIXI_ENV:-}" ]; then
    set +u  # activation scripts may read variables that are not set
    eval "$(pixi shell-hook --frozen --environment "$PIXI_ENV")"
    set -u
    PYTHON=$(command -v python)  # absolute: ranks on other nodes may not get this PATH
elif [ -z "${PYTHON:-}" ]; then
    make setup-mpi
    PYTHON=.venv/bin/python
fi
