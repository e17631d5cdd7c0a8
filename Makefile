# make run        : make setup, then train with 4 workers on Fashion-MNIST
# make test       : make setup and make setup-mpi, then the whole test suite
# make setup      : .venv with the project (editable, with the `libe-cnn` command), and a check
#                   that redis-server and Fashion-MNIST are where the trainer looks for them
# make setup-mpi  : mpi4py in .venv (the `mpi` extra), for --comms mpi and multinode/*.sh
# make run ARGS="--epochs 3 -n 2" passes options through to run_libe_cnn.py
#
# What is already there is used as it is: redis-server on PATH, Fashion-MNIST in ./data or
# Debian's package, an MPI on PATH. What is missing is installed with apt-get where that is
# allowed (root, or sudo without a password). Elsewhere Fashion-MNIST is downloaded into
# ./data, and anything else missing is named in one line, with how to install it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
# Versions pip is held to (see the file); `make setup CONSTRAINTS=` installs without them.
CONSTRAINTS ?= constraints.txt
PIP := $(PY) -m pip install --quiet --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# Fashion-MNIST ships as a Debian package, so a machine whose only network is the
# package registries can train on real data; the command-line default stays MNIST.
RUN_ARGS := -n 4 --dataset fashion-mnist

.PHONY: run test setup setup-mpi system-deps data mpi-deps clean

run: setup
	$(PY) run_libe_cnn.py $(RUN_ARGS) $(ARGS)

test: setup setup-mpi
	$(PY) -m pytest $(ARGS)

setup: $(VENV)/.installed system-deps data

setup-mpi: $(VENV)/.installed-mpi

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[test]'
	touch $@

# mpi4py's wheels load the MPI library found at run time, so the one on PATH here (a site's
# `module load`, or Debian's Open MPI) is the one the ranks use.
$(VENV)/.installed-mpi: $(VENV)/.installed | mpi-deps
	$(PIP) -e '.[mpi]'
	touch $@

# Prints "sudo" or nothing and succeeds where apt-get may install packages (root, or sudo
# without a password); fails elsewhere.
APT_SUDO := command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && echo sudo; }; }

# $(call apt_get,PACKAGES), in a recipe after sudo=$$($(APT_SUDO)) succeeded.
apt_get = echo "installing $(1) with apt-get"; $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $(1) >/dev/null

system-deps:
	@command -v redis-server >/dev/null 2>&1 || \
	if sudo=$$($(APT_SUDO)); then $(call apt_get,redis-server); \
	else echo "redis-server not found on PATH: install it (Debian/Ubuntu: sudo apt-get install redis-server;" \
	  "conda or pixi: redis-server from conda-forge; macOS: brew install redis)," \
	  "or train against a server you run with --redis-host"; exit 1; fi

# Looked for as a run looks (./data/FashionMNIST/raw, then Debian's package); where it is not
# there, Debian's package if apt-get may be used, else a download into ./data, which names in
# one line what to do when it fails.
data: $(VENV)/.installed
	@$(PY) -m libe_cnn fetch fashion-mnist --no-download >/dev/null 2>&1 || \
	if sudo=$$($(APT_SUDO)); then $(call apt_get,dataset-fashion-mnist); \
	else $(PY) -m libe_cnn fetch fashion-mnist; fi

# The MPI tests launch real mpiexec jobs; mpi4py finds its library through the same MPI.
mpi-deps:
	@command -v mpiexec >/dev/null 2>&1 || \
	if sudo=$$($(APT_SUDO)); then $(call apt_get,openmpi-bin libopenmpi-dev); \
	else echo "mpiexec not found on PATH: load or install an MPI (on a cluster: module load the site's MPI;" \
	  "Debian/Ubuntu: sudo apt-get install openmpi-bin libopenmpi-dev; conda or pixi: openmpi or mpich)"; exit 1; fi

clean:
	rm -rf $(VENV) .pytest_cache
