# make run   : set up .venv and the system packages, then train with 4 workers on Fashion-MNIST
# make test  : the same setup, then the whole test suite
# make run ARGS="--epochs 3 -n 2" passes options through to run_libe_cnn.py

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
# Fashion-MNIST ships as a Debian package, so a machine whose only network is the
# package registries can train on real data; the command-line default stays MNIST.
RUN_ARGS := -n 4 --dataset fashion-mnist

.PHONY: run test setup system-deps mpi-deps clean

run: setup
	$(PY) run_libe_cnn.py $(RUN_ARGS) $(ARGS)

test: setup $(VENV)/.installed-mpi
	$(PY) -m pytest $(ARGS)

setup: $(VENV)/.installed system-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

$(VENV)/.installed-mpi: $(VENV)/.installed | mpi-deps
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[mpi]'
	touch $@

# Installs what is missing through apt-get when allowed (root, or sudo without a
# password); otherwise says in one line what to install.
define apt_install
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then sudo=""; \
	  elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo"; \
	  else echo "missing:$$missing. Install them (Debian/Ubuntu: sudo apt-get install$$missing; elsewhere: pixi run train)"; exit 1; fi; \
	  echo "installing$$missing with apt-get"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq$$missing >/dev/null; \
	fi
endef

system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing="$$missing dataset-fashion-mnist"; \
	$(apt_install)

# The MPI tests launch real mpiexec jobs; mpi4py (a test dependency) builds against this MPI.
mpi-deps:
	@missing=""; \
	command -v mpiexec >/dev/null 2>&1 || missing="$$missing openmpi-bin libopenmpi-dev"; \
	$(apt_install)

clean:
	rm -rf $(VENV) .pytest_cache
