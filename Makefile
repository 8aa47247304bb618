# Everything builds idempotently: Debian packages, the venv, Horovod (cached wheel), the project.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kfac-hvd-ready
NP ?= 2

.PHONY: setup demo test clean-venv

setup: $(STAMP)

$(STAMP): setup.py scripts/install_horovod.sh scripts/install_system.sh
	bash scripts/install_system.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 pyyaml mpi4py tqdm tensorboard matplotlib pytest cmake
	PYTHON=$(PY) bash scripts/install_horovod.sh
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(STAMP)
	NP=$(NP) bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
