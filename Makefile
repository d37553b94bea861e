# mmlib — make setup | reproduce | test | lab | sync | clean
# `make help` lists the targets and variables.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmlib-setup

PROFILE ?= quick
NB      ?=
RESULTS ?= results
SEED    ?=
DEVICE  ?=
DATA    ?=
# Notebooks run JOBS at a time, each on THREADS CPU threads. CPU results change in the last digits
# with the thread count, so THREADS is fixed (2, the reference machine's cores): a machine with
# more cores runs more notebooks at once and gets the same tables. Measured on 2 cores, two
# one-thread notebooks side by side were slower overall than one two-thread notebook after
# another (benchmarks/README.md). The full profile runs one notebook at a time on torch's default
# threads (every core).
CORES   := $(shell nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
THREADS ?= $(if $(filter full,$(PROFILE)),,2)
JOBS    ?= $(if $(THREADS),$(shell j=$$(( $(CORES) / $(THREADS) )); [ $$j -lt 1 ] && j=1; echo $$j),1)

NOTEBOOK_DIR ?= notebooks
NOTEBOOKS := $(sort $(filter-out $(NOTEBOOK_DIR)/_%,$(wildcard $(NOTEBOOK_DIR)/$(NB)*.py)))
NB_NAMES  := $(notdir $(basename $(NOTEBOOKS)))

RUN_ARGS := --profile $(PROFILE) --results $(RESULTS) $(if $(SEED),--seed $(SEED)) $(if $(DEVICE),--device $(DEVICE)) $(if $(DATA),--data-dir $(DATA)) $(if $(THREADS),--threads $(THREADS))

.PHONY: help setup constraints data reproduce replicate test lab sync clean $(addprefix run-,$(NB_NAMES))

help:  ## list targets
	@echo "make setup       create $(VENV) with pinned dependencies and the 'mmlib' Jupyter kernel"
	@echo "make reproduce   execute every notebook into $(RESULTS)/ and build $(RESULTS)/index.html"
	@echo "                 NB=p2 (notebooks starting with p2)  PROFILE=smoke|quick|full  SEED=0  DEVICE=cpu|cuda"
	@echo "                 DATA=folder (cohorts; default \$$MMLIB_DATA_DIR or data/)"
	@echo "                 JOBS=$(JOBS) (notebooks at once)  THREADS=$(THREADS) (CPU threads each; empty = all cores)"
	@echo "make replicate   run NB's notebooks at each of SEEDS (default 0 1 2) into $(RESULTS)/replicates/ and"
	@echo "                 tabulate whether each claim's verdict is the same at every seed (a finished"
	@echo "                 make reproduce run of this clean commit stands in for its seed; JOBS seeds at once)"
	@echo "make data        generate the five cohorts (PROFILE=smoke|quick|full, DATA=folder; default data/)"
	@echo "make test        run the test suite (includes every notebook at the smoke profile)"
	@echo "make lab         JupyterLab; .py notebooks open as notebooks (jupytext); kernels use THREADS"
	@echo "make sync        regenerate the paired .ipynb from the .py notebooks"
	@echo "make clean       remove results, generated data and caches (keeps $(VENV))"

setup: $(STAMP)

# Re-runs only when the dependency declarations change. torch goes first and pinned, so no
# later requirement can pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else "mmlib needs Python >= 3.11, found " + sys.version.split()[0] + " at " + sys.executable)'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==$$(sed -n 's/^torch==//p' constraints.txt)"
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name mmlib --display-name "Python (mmlib)" >/dev/null
	@# JupyterLab in .venv opens .py files as notebooks (jupytext); right-click > Open With > Editor for plain code.
	@mkdir -p $(VENV)/share/jupyter/lab/settings
	@echo '{"@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"python": "Jupytext Notebook"}}}' \
	  > $(VENV)/share/jupyter/lab/settings/overrides.json
	@touch $(STAMP)
	@echo "setup done: $(VENV) ($$($(PY) -c 'import torch; print("torch", torch.__version__)'))"

# Re-pin constraints.txt to what is installed in $(VENV) (after changing pyproject.toml).
constraints: setup
	@{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable --disable-pip-version-check \
	   | grep -v -i '^mmlib' | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > constraints.txt.tmp
	@mv constraints.txt.tmp constraints.txt && echo "constraints.txt: $$(grep -c '==' constraints.txt) pins"
	@touch $(STAMP)  # the venv is what the new pins describe

SEEDS ?= 0 1 2
replicate: setup
	@test -n "$(NB)" || { echo "ERROR: name the notebooks, e.g. make replicate NB=p5 SEEDS='0 1 2'"; exit 2; }
	@test -n "$(NOTEBOOKS)" || { echo "ERROR: no notebook in $(NOTEBOOK_DIR)/ starts with '$(NB)'"; exit 2; }
	@for nb in $(NOTEBOOKS); do \
	  $(PY) -m mmlib replicate $$nb --seeds $(SEEDS) --profile $(PROFILE) --results $(RESULTS)/replicates \
	    $(if $(DEVICE),--device $(DEVICE)) $(if $(DATA),--data-dir $(DATA)) $(if $(THREADS),--threads $(THREADS)) --reuse $(RESULTS) --jobs $(JOBS) || exit $$?; \
	done; \
	$(PY) -m mmlib index $(RESULTS)

data: setup
	@$(PY) -m mmlib generate all --preset $(PROFILE) $(if $(SEED),--seed $(SEED)) $(if $(DATA),--data-dir $(DATA))

reproduce: setup
	@test -n "$(NOTEBOOKS)" || { echo "ERROR: no notebook in $(NOTEBOOK_DIR)/ starts with '$(NB)'"; exit 2; }
	@$(MAKE) --no-print-directory --keep-going -j$(JOBS) $(addprefix run-,$(NB_NAMES)); status=$$?; \
	  $(PY) -m mmlib index $(RESULTS); \
	  if [ $$status -ne 0 ]; then echo "make reproduce: at least one notebook failed (see above and $(RESULTS)/index.html)"; fi; \
	  exit $$status

$(addprefix run-,$(NB_NAMES)): run-%: setup
	@$(PY) -m mmlib run $(NOTEBOOK_DIR)/$*.py $(RUN_ARGS)

test: setup
	$(PY) -m pytest

# Kernels inherit THREADS (as make reproduce's notebooks do), so a notebook run in JupyterLab prints the
# tables results/ holds; `make lab THREADS=` gives them every core (the last digits then differ).
lab: setup
	$(if $(THREADS),OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS)) $(VENV)/bin/jupyter lab --notebook-dir=.

sync: setup
	$(VENV)/bin/jupytext --sync notebooks/[!_]*.py

clean:
	rm -rf $(RESULTS) data .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf
	find notebooks -name '*.ipynb' -delete
