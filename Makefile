# PhilEO HPC — the two commands a new user needs:
#   make demo   the whole pipeline end to end on an embedded sample (no cluster, no downloads)
#   make test   set up from nothing (venv, pinned packages, the local SLURM cluster) and run every test
#
# The venv is for machines without conda (CI, laptops). Clusters use environment.yml (CUDA builds).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.phileo-installed
# CPU torch first and pinned: an unpinned torch would pull several GB of CUDA packages.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_DIR ?= demo
SLURM ?= 0

.PHONY: venv test test-fast demo bench cluster-up cluster-down clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@$(PY) -c "import torch, deepspeed, h5py, rasterio, submitit; print('venv ready: torch', torch.__version__)" 2>/dev/null
	@touch $(STAMP)

# Everything, SLURM tests included (the session fixture starts the dev cluster; needs root for that).
# First the no_slurm group: the launchers with the SLURM client hidden from PATH, as on a laptop or a fresh
# machine, before anything has installed or started SLURM; then all the rest. Exit 5 is pytest's "no test
# selected" (a PYTEST_ARGS="-k ..." that matches only one of the two runs).
test: venv
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(PY) -m pytest -m no_slurm $(PYTEST_ARGS) || [ $$? -eq 5 ]
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(PY) -m pytest -m "not no_slurm" $(PYTEST_ARGS) || [ $$? -eq 5 ]

# Without the cluster tests and the slow ones: the inner loop while editing.
test-fast: venv
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slurm and not slow" $(PYTEST_ARGS)

# SLURM=1: the same stages as SLURM jobs on the local dev cluster (started here if needed; needs root).
demo: venv
ifeq ($(SLURM),1)
	eval "$$(slurm/dev-cluster/up.sh --nodes 4 | tail -n 1)" && \
	  DS_ACCELERATOR=cpu $(PY) jobs/demo.py --out $(DEMO_DIR) --cluster slurm
else
	DS_ACCELERATOR=cpu $(PY) jobs/demo.py --out $(DEMO_DIR) --cluster local
endif

bench: venv
	DS_ACCELERATOR=cpu $(PY) benchmarks/run_all.py

cluster-up:
	slurm/dev-cluster/up.sh --nodes 4

cluster-down:
	slurm/dev-cluster/down.sh

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
