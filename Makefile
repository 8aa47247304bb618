# Everything builds idempotently: Debian packages, the venv, torch, Horovod (cached wheel), the project.
# The venv holds what requirements/lock.txt says, file hashes and all; `make lock` refreshes that lock.
# HOROVOD_GPU_OPERATIONS=NCCL make setup   installs the NCCL flavour of Horovod instead of the cpu one.
# ENGINE=torch make setup (or make setup ENGINE=torch)   skips Horovod: the venv for train.engine=torch
#   (torch.distributed); `make demo ENGINE=torch` runs the demo under torchrun.
# TORCH_SPEC="torch==X torchvision==Y" TORCH_INDEX_URL=URL make setup   installs that torch build (pip
#   requirements, from that index; default: the pins below, from pip's configured indexes); a torch that
#   satisfies TORCH_SPEC is kept. The V100 set-up: README.md, "GPU generations".
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX_URL ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kfac-hvd-ready
NP ?= 2
ENGINE ?= horovod
SDIST_DIR := .gpu_carry
LOCK := requirements/lock.txt

.PHONY: setup torch horovod horovod-sdist demo test lint lock clean-venv

# The chain's last link: Horovod (which needs torch), or torch alone for ENGINE=torch.
setup: $(if $(filter torch,$(ENGINE)),torch,horovod)

INSTALL_TORCH = PYTHON=$(PY) TORCH_SPEC="$(TORCH_SPEC)" TORCH_INDEX_URL="$(TORCH_INDEX_URL)" bash scripts/install_torch.sh

# The venv: the torch build first (TORCH_SPEC), then every locked package at its locked version and hash
# (setup.py's lists, the build tools, pip; with another torch build than the locked one, that build's own
# packages are left as pip chose them), then the project itself, and a check that the venv is the lock.
$(STAMP): setup.py $(LOCK) scripts/install_system.sh
	bash scripts/install_system.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(INSTALL_TORCH)
	$(PY) scripts/lock.py install
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) scripts/lock.py check
	touch $@

# Resolves setup.py's lists, requirements/lock.in and TORCH_SPEC again, with today's releases, into
# requirements/lock.txt (uv pip compile --generate-hashes); the next `make setup` installs it.
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	test -x $(VENV)/bin/uv || $(PY) -m pip install -q uv
	TORCH_SPEC="$(TORCH_SPEC)" $(PY) scripts/lock.py compile

# Always run: the script returns in a fraction of a second when the installed torch satisfies TORCH_SPEC,
# so a venv set up with another build (a V100's CUDA 12.6 torch) keeps it.
torch: $(STAMP)
	$(INSTALL_TORCH)

# Always run: the script returns in seconds when the asked-for flavour (HOROVOD_GPU_OPERATIONS) is
# installed, and reinstalls (cached wheel) or rebuilds when another one is. MPI is part of this
# machine's setup, so its absence is an error here rather than a Horovod without MPI.
horovod: torch
	PYTHON=$(PY) KFAC_HVD_REQUIRE_MPI=1 bash scripts/install_horovod.sh

# The Horovod sdist in a git-ignored folder, for building on a machine without internet.
horovod-sdist:
	PYTHON=$$(test -x $(PY) && echo $(PY) || echo python3) bash scripts/install_horovod.sh --download-sdist $(SDIST_DIR)

demo: setup
	NP=$(NP) ENGINE=$(ENGINE) bash scripts/demo.sh

# Strict: a missing or broken Horovod, mpirun or Fashion-MNIST fails the run instead of skipping tests.
test: setup
	KFAC_HVD_STRICT=1 $(PY) -m pytest -q -rs tests

# Lint (ruff.toml) and format check over the repository, types (setup.cfg's [mypy]) over the library and
# the launcher. Needs the venv (make setup).
lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Mutation testing of the maths (setup.cfg's [mutmut] section; docs/TESTING.md): long, not part of
# `test`. Niced and one thread, so a shared machine stays usable; results stay in mutants/.
.PHONY: mutation
mutation: setup
	$(PY) -m pip install -q mutmut==3.8.1
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 15 $(VENV)/bin/mutmut run --max-children 1
	$(VENV)/bin/mutmut results

clean-venv:
	rm -rf $(VENV)
